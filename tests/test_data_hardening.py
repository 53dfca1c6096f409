"""Image folders and text files that used to load wrongly or fail with a traceback (issue 20, items 9,
13 and the label part of 11): each case is a real file made here, and each error is one line that
names the file, also when a data-loader worker process reads it."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_data import SIZE, WORDS, tiny_tokenizer, write_image_folder
from torch.utils.data import DataLoader

from compile_toolkit.cli import main
from compile_toolkit.data.images import Preprocessing, image_folder
from compile_toolkit.data.text import text_files
from compile_toolkit.errors import CtkError

# mean 0, std 1 and the images' own size: an item is the grey pixels / 255, untouched otherwise
PIXELS = Preprocessing((SIZE, SIZE), channels=1, mean=(0.0,), std=(1.0,))


def two_classes(root: Path) -> Path:
    """train/ and val/ with two classes of three digit PNGs each: 6 images per split."""
    return write_image_folder(root, classes=(0, 1), per_class=3)


def read_all(dataset: torch.utils.data.Dataset) -> list:
    return [dataset[i] for i in range(len(dataset))]


def one_line_naming(error: BaseException, path: Path) -> bool:
    return str(path) in str(error) and "\n" not in str(error)


@pytest.mark.parametrize("loop", [False, True])
def test_a_symlink_loop_in_a_class_folder_is_not_followed(tmp_path, loop):
    """`train/digit0/loop -> ..` made torchvision walk train/ again and again (246 images for 6)."""
    root = two_classes(tmp_path / "data")
    if loop:
        (root / "train" / "digit0" / "loop").symlink_to("..", target_is_directory=True)
    splits = image_folder(root, PIXELS)
    assert len(splits.train) == 6 and len(splits.val) == 6
    assert [label for _, label in read_all(splits.train)] == [0, 0, 0, 1, 1, 1]


def png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each chunk of a PNG file."""
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        chunks.append((data[at + 4:at + 8], data[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def png_file(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A PNG file of these chunks, each with a correct CRC (so `verify()` accepts it)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    return b"\x89PNG\r\n\x1a\n" + b"".join(chunk(kind, payload) for kind, payload in chunks)


@pytest.mark.parametrize("dtype, name, mode", [(np.uint16, "0.png", "I;16"), (np.int32, "0.tif", "I")])
def test_16_bit_grey_is_scaled_to_8_bits_not_clipped(tmp_path, dtype, name, mode):
    """A 16-bit grey PNG (PIL mode I;16), or 32-bit integer grey holding 16-bit values, read through
    RGB was clipped to 255 on almost every pixel."""
    from PIL import Image

    root = two_classes(tmp_path / "data")
    wide = np.linspace(0, 65535, SIZE * SIZE).round().astype(dtype).reshape(SIZE, SIZE)
    (root / "train" / "digit1" / "0.png").unlink()
    path = root / "train" / "digit1" / name
    Image.fromarray(wide).save(path)
    with Image.open(path) as image:
        assert image.mode == mode  # a real file of that many bits
    item, label = image_folder(root, PIXELS).train[3]  # digit1 0.*, 1.png, 2.png
    expected = torch.from_numpy(np.round(wide / 257.0).astype(np.float32) / 255).unsqueeze(0)
    assert label == 1 and torch.allclose(item, expected, atol=1e-6)
    assert float((item == 1.0).float().mean()) < 0.01


def test_integer_grey_beyond_16_bits_is_refused_naming_the_file(tmp_path):
    from PIL import Image

    root = two_classes(tmp_path / "data")
    path = root / "val" / "digit0" / "9.tif"
    Image.fromarray(np.full((SIZE, SIZE), 70_000, dtype=np.int32)).save(path)
    with pytest.raises(CtkError) as error:
        read_all(image_folder(root, PIXELS).val)
    assert one_line_naming(error.value, path) and "outside 0..65535" in str(error.value)


def test_an_8_bit_png_reads_as_before(tmp_path):
    from PIL import Image

    root = two_classes(tmp_path / "data")
    path = root / "val" / "digit0" / "2.png"
    with Image.open(path) as image:
        expected = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255).unsqueeze(0)
    item, label = image_folder(root, PIXELS).val[2]
    assert label == 0 and torch.equal(item, expected)


def test_a_decompression_bomb_header_is_one_line(tmp_path):
    """A PNG header of 100000 x 100000 pixels: PIL's DecompressionBombError, not an OSError."""
    root = two_classes(tmp_path / "data")
    path = root / "val" / "digit1" / "1.png"
    chunks = dict(png_chunks(path.read_bytes()))
    header = struct.pack(">II", 100_000, 100_000) + chunks[b"IHDR"][8:]
    path.write_bytes(png_file([(b"IHDR", header), (b"IDAT", chunks[b"IDAT"]), (b"IEND", b"")]))
    with pytest.raises(CtkError) as error:
        read_all(image_folder(root, PIXELS).val)
    assert one_line_naming(error.value, path) and "cannot be read" in str(error.value)


def garbage_idat(path: Path) -> Path:
    """Replace the image data of a PNG with bytes that are no deflate stream, CRCs kept right."""
    chunks = [(kind, b"x\x9c" + b"not a deflate stream" * 8 if kind == b"IDAT" else payload)
              for kind, payload in png_chunks(path.read_bytes())]
    path.write_bytes(png_file(chunks))
    return path


def test_a_png_with_a_broken_zlib_stream_is_one_line(tmp_path):
    from PIL import Image

    root = two_classes(tmp_path / "data")
    path = garbage_idat(root / "val" / "digit0" / "1.png")
    with Image.open(path) as image:
        image.verify()  # what the folder check used to rely on
    with pytest.raises(CtkError) as error:
        read_all(image_folder(root, PIXELS).val)
    assert one_line_naming(error.value, path) and "cannot be read" in str(error.value)


def test_a_broken_image_read_by_a_loader_worker_is_one_line(tmp_path):
    """A DataLoader worker process re-raises the error with its traceback in the message; the
    message is still the one line (what `ctk train --workers N` prints)."""
    root = two_classes(tmp_path / "data")
    path = garbage_idat(root / "train" / "digit1" / "2.png")
    loader = DataLoader(image_folder(root, PIXELS).train, batch_size=6, num_workers=1)
    with pytest.raises(CtkError) as error:
        next(iter(loader))
    assert one_line_naming(error.value, path) and str(error.value).startswith(f"image file {path} cannot be read")


def test_ctk_export_on_a_broken_zlib_stream_prints_one_line(tmp_path, capsys):
    root = two_classes(tmp_path / "data")
    path = garbage_idat(root / "val" / "digit0" / "0.png")
    status = main(["export", "--model", "timm:resnet18", "--data", str(root), "--input-shape", "1,3,16,16",
                   "--batch-size", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith(f"ctk: error: image file {path} cannot be read") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("label", [lambda i: {"a": i % 2}, lambda i: [i % 2, 1]], ids=["dict", "list"])
def test_non_scalar_jsonl_labels_are_refused_naming_file_row_and_column(tmp_path, label):
    """Dict labels became class names such as "{'a': 1}"; the row is counted from 1."""
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": " ".join(WORDS[: 3 + i]), "label": label(i)} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(CtkError) as error:
        text_files(path, tiny_tokenizer(WORDS), "classify", block_size=8)
    assert one_line_naming(error.value, path) and "row 1, column 'label'" in str(error.value)


def test_non_scalar_label_in_the_second_file_of_a_folder_names_that_file(tmp_path):
    """Files read together: `datasets` cast the dicts of the second file to JSON text such as
    '{"stars":1}' after the first file's string labels. The row is counted in its own file."""
    folder = tmp_path / "reviews"
    folder.mkdir()
    first = [{"text": " ".join(WORDS[: 3 + i]), "label": "good" if i % 2 else "bad"} for i in range(4)]
    second = [{"text": " ".join(WORDS[i: 3 + i]), "label": "good" if i % 2 else "bad"} for i in range(5)]
    second[1]["label"] = {"stars": 1}
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in first) + "\n")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in second) + "\n")
    with pytest.raises(CtkError) as error:
        text_files(folder, tiny_tokenizer(WORDS), "classify", block_size=8)
    assert one_line_naming(error.value, folder / "b.jsonl") and "row 2, column 'label'" in str(error.value)


def test_scalar_jsonl_labels_still_load(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": " ".join(WORDS[: 3 + i]), "label": i % 3} for i in range(9)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    splits = text_files(path, tiny_tokenizer(WORDS), "classify", block_size=8, val_fraction=0.3)
    assert splits.classes == ["0", "1", "2"] and len(splits.train) == 6 and len(splits.val) == 3
