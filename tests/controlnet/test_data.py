"""ControlNet data: the fill50k generator, both folder layouts, datasets.load_dataset, Canny on the fly, bad images."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from controlnet import canny
from controlnet.data import ControlNetDataset, build_rows, collate, read_fill50k, read_imagefolder, resize_center_crop

from .sd_fixtures import fill_data, make_fill_dataset

PALETTE = make_fill_dataset.PALETTE


def _png(path):
    return np.array(Image.open(path).convert("RGB"))


def _copy(tmp_path, src=None):
    dst = tmp_path / "data"
    shutil.copytree(src or fill_data(), dst)
    return dst


# ----------------------------------------------------------------------------------------------- generator
def test_fill_generator_deterministic_and_checkable(tmp_path):
    a = make_fill_dataset.write_fill_dataset(tmp_path / "a", 12, 40, seed=3, fmt="both")
    b = make_fill_dataset.write_fill_dataset(tmp_path / "b", 12, 40, seed=3, fmt="both")
    c = make_fill_dataset.write_fill_dataset(tmp_path / "c", 12, 40, seed=4, fmt="fill50k")
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 2 * 12 + 2
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "prompt.json").read_text() != (c / "prompt.json").read_text()
    yy, xx = np.mgrid[:40, :40]
    for rec in map(json.loads, (a / "prompt.json").read_text().splitlines()):
        assert rec["prompt"] == f"{rec['circle_color']} circle with {rec['background_color']} background"
        assert rec["circle_color"] != rec["background_color"]
        tgt, src = _png(a / rec["target"]), _png(a / rec["source"])
        (cx, cy), r = rec["center"], rec["radius"]
        d = np.hypot(xx - cx, yy - cy)
        inside, outside = d < r - 1.5, d > r + 1.5
        assert (tgt[inside] == PALETTE[rec["circle_color"]]).all()
        assert (tgt[outside] == PALETTE[rec["background_color"]]).all()
        # condition: white outline on black, only near the circle boundary
        assert set(np.unique(src)) <= {0, 255} and (src[..., 0] == src[..., 2]).all()
        assert (src[inside | outside] == 0).all()
        for ang in np.linspace(0, 2 * np.pi, 64, endpoint=False):  # a closed ring: white within 1 px everywhere
            x, y = int(round(cx + r * np.cos(ang))), int(round(cy + r * np.sin(ang)))
            assert src[max(0, y - 1): y + 2, max(0, x - 1): x + 2].max() == 255
    meta = [json.loads(x) for x in (a / "metadata.jsonl").read_text().splitlines()]
    fill = [json.loads(x) for x in (a / "prompt.json").read_text().splitlines()]
    assert [(m["file_name"], m["conditioning_image"], m["text"]) for m in meta] == \
        [(f["target"], f["source"], f["prompt"]) for f in fill]


def test_fill_generator_rejects_bad_format(tmp_path):
    with pytest.raises(ValueError, match="fill50k, imagefolder, both"):
        make_fill_dataset.write_fill_dataset(tmp_path, 2, 32, fmt="parquet")


# ----------------------------------------------------------------------------------------------- layouts
def test_fill50k_layout_items():
    root = fill_data()
    ds = ControlNetDataset(read_fill50k(root), 32, root)
    assert len(ds) == 32 and ds.conditioning == "dataset"
    recs = [json.loads(x) for x in (root / "prompt.json").read_text().splitlines()]
    for i in (0, 7):
        item = ds[i]
        assert item["pixel_values"].shape == (3, 32, 32) and item["conditioning_pixel_values"].shape == (3, 32, 32)
        assert item["text"] == recs[i]["prompt"]
        torch.testing.assert_close(item["pixel_values"],
                                   torch.from_numpy(_png(root / recs[i]["target"])).permute(2, 0, 1) / 127.5 - 1)
        torch.testing.assert_close(item["conditioning_pixel_values"],
                                   torch.from_numpy(_png(root / recs[i]["source"])).permute(2, 0, 1) / 255.0)
    batch = collate([ds[0], ds[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32) and batch["text"] == [recs[0]["prompt"], recs[1]["prompt"]]
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1


def test_imagefolder_equals_fill50k_and_custom_columns(tmp_path):
    root = fill_data()
    a = ControlNetDataset(read_fill50k(root), 32, root)
    r = _copy(tmp_path, root)
    assert build_rows(train_data_dir=r)[0][0]["image"] == r / "target" / "0.png"  # prompt.json wins when both exist
    (r / "prompt.json").unlink()
    rows, r = build_rows(train_data_dir=r)
    b = ControlNetDataset(rows, 32, r)
    for i in (0, 5, 31):
        for k in ("pixel_values", "conditioning_pixel_values", "text"):
            assert (a[i][k] == b[i][k]).all() if k != "text" else a[i][k] == b[i][k]
    # renamed columns via *_column arguments; a missing one names the flag to set
    lines = [json.loads(x) for x in (r / "metadata.jsonl").read_text().splitlines()]
    (r / "metadata.jsonl").write_text("\n".join(json.dumps({"img": m["file_name"], "hint": m["conditioning_image"],
                                                            "caption": m["text"]}) for m in lines))
    c = ControlNetDataset(read_imagefolder(r, "img", "hint", "caption"), 32, r)
    assert c[3]["text"] == a[3]["text"] and torch.equal(c[3]["conditioning_pixel_values"],
                                                        a[3]["conditioning_pixel_values"])
    with pytest.raises(ValueError, match="--caption_column"):
        read_imagefolder(r, "img", "hint", "text")
    with pytest.raises(ValueError, match="--image_column"):
        read_imagefolder(r, "image", "hint", "caption")


def test_canny_on_the_fly(tmp_path):
    r = _copy(tmp_path)
    lines = [json.loads(x) for x in (r / "metadata.jsonl").read_text().splitlines()]
    (r / "prompt.json").unlink()
    (r / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": m["file_name"], "text": m["text"]})
                                                for m in lines))
    rows, _ = build_rows(train_data_dir=r)
    with pytest.raises(ValueError, match="--conditioning canny"):
        ControlNetDataset(rows, 32, r, conditioning="dataset")
    with pytest.raises(ValueError, match="no row has a conditioning image.*--conditioning canny"):
        ControlNetDataset(rows, 32, r)  # auto: the data's conditions; Canny only when asked
    ds = ControlNetDataset(rows, 32, r, conditioning="canny")
    assert ds.conditioning == "canny"
    with_edges = 0
    for i in range(6):
        item = ds[i]
        img = _png(r / lines[i]["file_name"])
        expect = torch.from_numpy(canny(img).transpose(2, 0, 1) / 255.0).float()
        assert torch.equal(item["conditioning_pixel_values"], expect)
        # Canny of a filled circle traces the generator's outline condition
        edges = item["conditioning_pixel_values"][0].numpy() > 0
        outline = _png(r / lines[i]["conditioning_image"])[..., 0] > 0
        near = np.zeros_like(outline)
        for dy in (-2, -1, 0, 1, 2):
            for dx in (-2, -1, 0, 1, 2):
                near |= np.roll(np.roll(outline, dy, 0), dx, 1)
        if edges.any():  # (colour pairs of similar luminance give no edges at thresholds 100/200)
            with_edges += 1
            assert (edges & near).sum() / edges.sum() > 0.9
    assert with_edges >= 2


def test_resize_center_crop():
    a = np.zeros((30, 60, 3), np.uint8)
    a[:, 10:50] = 255  # a white band wider than the central crop
    out = np.asarray(resize_center_crop(Image.fromarray(a), 16))
    assert out.shape == (16, 16, 3) and out.min() == 255  # short side 30 -> 16, width 32 -> middle 16 kept
    ds_rows = [{"image": Image.fromarray(a), "conditioning_image": Image.fromarray(a), "text": "x"}]
    item = ControlNetDataset(ds_rows, 16)[0]
    assert torch.equal(item["pixel_values"], torch.ones(3, 16, 16))
    assert torch.equal(item["conditioning_pixel_values"], torch.ones(3, 16, 16))


# ----------------------------------------------------------------------------------------------- bad images
def test_bad_image_error_and_skip(tmp_path):
    r = _copy(tmp_path)
    (r / "target" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (r / "source" / "5.png").write_bytes(b"")
    rows = read_fill50k(r)
    ds = ControlNetDataset(rows, 32, r)
    with pytest.raises(ValueError, match=r"target/3\.png.*--skip_bad_images"):
        ds[3]
    with pytest.raises(ValueError, match=r"source/5\.png"):
        ds[5]
    skip = ControlNetDataset(rows, 32, r, skip_bad_images=True)
    assert len(skip) == 30 and sorted(i for i, _, _ in skip.skipped) == [3, 5]
    assert any(f.endswith("target/3.png") for _, f, _ in skip.skipped)
    assert [skip[k]["index"] for k in range(len(skip))] == [i for i in range(32) if i not in (3, 5)]
    with pytest.raises(ValueError, match="not a directory"):
        build_rows(train_data_dir=r / "missing")
    with pytest.raises(ValueError, match="exactly one"):
        build_rows()


# ----------------------------------------------------------------------------------------------- datasets
def test_datasets_load_dataset_local_imagefolder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("datasets")
    r = _copy(tmp_path)
    (r / "prompt.json").unlink()
    rows, root = build_rows(dataset_name=str(r), cache_dir=str(tmp_path / "cache"))
    ds = ControlNetDataset(rows, 32, root)
    ref = ControlNetDataset(read_imagefolder(r), 32, r)
    assert len(ds) == len(ref) == 32
    for i in (0, 9):
        assert ds[i]["text"] == ref[i]["text"]
        assert torch.equal(ds[i]["pixel_values"], ref[i]["pixel_values"])
        assert torch.equal(ds[i]["conditioning_pixel_values"], ref[i]["conditioning_pixel_values"])
    with pytest.raises(ValueError, match="--caption_column"):
        build_rows(dataset_name=str(r), cache_dir=str(tmp_path / "cache"), caption_column="prompt")


def test_relative_train_data_dir(tmp_path, monkeypatch):
    _copy(tmp_path)
    monkeypatch.chdir(tmp_path)
    for layout_file in ("prompt.json", "metadata.jsonl"):
        rows, root = build_rows(train_data_dir="data")
        item = ControlNetDataset(rows, 32, root)[2]
        assert item["pixel_values"].shape == (3, 32, 32)
        (tmp_path / "data" / layout_file).unlink()  # next: the imagefolder layout


# ----------------------------------------------------------------------------------------------- local table files
def _table_copy(tmp_path, n=8):
    """fill data with its metadata as a list of records, the table files beside the images."""
    r = _copy(tmp_path, fill_data(n=n, fmt="imagefolder"))
    recs = [json.loads(x) for x in (r / "metadata.jsonl").read_text().splitlines()]
    (r / "metadata.jsonl").unlink()
    return r, [{"image": m["file_name"], "conditioning_image": m["conditioning_image"], "text": m["text"]}
               for m in recs]


def _write_tables(r, recs):
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq

    (r / "train.jsonl").write_text("\n".join(json.dumps(m) for m in recs) + "\n")
    (r / "train.json").write_text(json.dumps(recs, indent=1))  # a JSON array of records
    with open(r / "train.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows(recs)
    pq.write_table(pa.Table.from_pylist(recs), r / "train.parquet")


def test_local_json_jsonl_csv_parquet_files(tmp_path, monkeypatch):
    """--dataset_name train.jsonl (a local file) and --data_files: rows with image paths relative to the file."""
    pytest.importorskip("pyarrow")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r, recs = _table_copy(tmp_path)
    _write_tables(r, recs)
    ref_root = fill_data(n=8, fmt="both")  # the same 8 samples in the fill50k layout
    ref = ControlNetDataset(read_fill50k(ref_root), 32, ref_root)
    for name in ("train.jsonl", "train.json", "train.csv", "train.parquet"):
        for kw in ({"dataset_name": str(r / name)}, {"data_files": [str(r / name)]},
                   {"data_files": name, "train_data_dir": str(r)}):  # relative to --train_data_dir
            rows, root = build_rows(**kw)
            ds = ControlNetDataset(rows, 32, root)
            assert len(ds) == 8 and ds.conditioning == "dataset", (name, kw)
            for i in (0, 5):
                assert ds[i]["text"] == ref[i]["text"]
                assert torch.equal(ds[i]["pixel_values"], ref[i]["pixel_values"])
                assert torch.equal(ds[i]["conditioning_pixel_values"], ref[i]["conditioning_pixel_values"])
    monkeypatch.chdir(r)  # relative to the working directory; several files are concatenated
    rows, _ = build_rows(data_files=["train.csv", "train.parquet"], dataset_name="csv")
    assert len(rows) == 16 and rows[8]["image"] == r / "target" / "0.png"
    sub = r / "lists"
    sub.mkdir()
    (sub / "a.jsonl").write_text(json.dumps({**recs[2], "image": "../" + recs[2]["image"],
                                             "conditioning_image": "../" + recs[2]["conditioning_image"]}))
    rows, root = build_rows(data_files=[str(sub / "a.jsonl")])
    assert torch.equal(ControlNetDataset(rows, 32, root)[0]["pixel_values"],
                       ref[2]["pixel_values"])  # paths are relative to the file, not to the cwd
    with pytest.raises(ValueError, match=r"no such file.*missing\.jsonl"):
        build_rows(dataset_name=str(r / "missing.jsonl"))
    (r / "train.txt").write_text("x")
    with pytest.raises(ValueError, match=r"\.json, \.jsonl, \.csv, \.parquet"):
        build_rows(data_files=[str(r / "train.txt")])
    with pytest.raises(ValueError, match="--dataset_name.*json, csv or parquet"):
        build_rows(data_files=[str(r / "train.csv")], dataset_name="fill50k")


def test_train_config_accepts_data_files(tmp_path):
    from controlnet.training import TrainControlNetConfig

    cfg = TrainControlNetConfig(pretrained_model_name_or_path="x", data_files=["a.jsonl", "b.csv"],
                                output_dir=str(tmp_path / "out"))
    assert cfg.data_files == ["a.jsonl", "b.csv"]
    with pytest.raises(ValueError, match="exactly one"):
        TrainControlNetConfig(pretrained_model_name_or_path="x", output_dir=str(tmp_path / "out"))


# ----------------------------------------------------------------------------------------------- rows, every one
def test_every_row_is_checked(tmp_path):
    r, recs = _table_copy(tmp_path)
    meta = r / "metadata.jsonl"

    def write(rows):
        meta.write_text("\n".join(json.dumps({("file_name" if k == "image" else k): v for k, v in m.items()})
                                  for m in rows) + "\n")

    # one row (line 4) without a condition: an error naming file:line, not Canny for every row
    write([m if i != 3 else {k: v for k, v in m.items() if k != "conditioning_image"}
                        for i, m in enumerate(recs)])
    rows, root = build_rows(train_data_dir=r)
    for mode in ("auto", "dataset"):
        with pytest.raises(ValueError, match=r"metadata\.jsonl:4: no conditioning image.*1 of 8 rows.*"
                                             r"--conditioning canny"):
            ControlNetDataset(rows, 32, root, conditioning=mode)
    assert ControlNetDataset(rows, 32, root, conditioning="canny").conditioning == "canny"  # only when asked
    # no condition column at all (e.g. a typo in --conditioning_image_column): an error, not silent Canny
    write(recs)
    rows, root = build_rows(train_data_dir=r, conditioning_image_column="conditoning_image")
    with pytest.raises(ValueError, match=r"'conditoning_image'.*columns: \[.*'conditioning_image'.*"
                                         r"--conditioning_image_column.*--conditioning canny"):
        ControlNetDataset(rows, 32, root)
    # a later row without a caption / image: file:line and the column, at start-up (not a KeyError mid-epoch)
    write([m if i != 6 else {k: v for k, v in m.items() if k != "text"} for i, m in enumerate(recs)])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:7: record lacks the caption column 'text'"):
        build_rows(train_data_dir=r)
    write([m if i != 5 else {**m, "image": None} for i, m in enumerate(recs)])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:6: record lacks the image column 'file_name'"):
        build_rows(train_data_dir=r)
    # the same checks on a csv file (empty cells) and on rows given directly
    import csv
    with open(r / "t.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(recs[0]))
        w.writeheader()
        w.writerows([m if i != 2 else {**m, "conditioning_image": ""} for i, m in enumerate(recs)])
    with pytest.raises(ValueError, match=r"t\.csv:4: no conditioning image"):
        ControlNetDataset(build_rows(data_files=[str(r / "t.csv")])[0], 32)
    direct = [{"image": r / m["image"], "conditioning_image": r / m["conditioning_image"], "text": m["text"]}
              for m in recs]
    direct[7] = {"image": direct[7]["image"], "text": "x"}
    with pytest.raises(ValueError, match=r"row 7: no conditioning image"):
        ControlNetDataset(direct, 32)


def test_datasets_rows_checked_per_row(tmp_path):
    datasets = pytest.importorskip("datasets")
    _, recs = _table_copy(tmp_path)
    ds = datasets.Dataset.from_list([m if i != 4 else {**m, "conditioning_image": None} for i, m in enumerate(recs)])
    from controlnet.data import HFRows
    with pytest.raises(ValueError, match=r"row 4: no conditioning image.*1 of 8 rows"):
        ControlNetDataset(HFRows(ds, root=tmp_path / "data"), 32, tmp_path / "data")
    with pytest.raises(ValueError, match=r"column 'hint' \(columns: \['image', .*--conditioning_image_column"):
        ControlNetDataset(HFRows(ds, conditioning_image_column="hint"), 32)


# ----------------------------------------------------------------------------------------------- image modes
def test_float_and_int32_tiffs_and_exif_orientation(tmp_path):
    from PIL import Image

    from controlnet.data import load_rgb
    from diffusion.training.data import ImageFolderDataset

    ramp = np.linspace(0, 1, 16, dtype=np.float32)[None].repeat(4, 0)  # 4x16 in [0, 1]
    expect = np.round(ramp * 255).astype(np.uint8)
    cases = {
        "f01.tif": (ramp, expect),  # float in [0, 1]: x 255 (PIL alone: black)
        "f_range.tif": (ramp * 1000 - 300, expect),  # float outside [0, 1]: its min..max -> 0..255
        "i8.tif": (expect.astype(np.int32), expect),  # 8-bit values in an int32 TIFF (PIL alone: 16-bit -> black)
        "i16.tif": (expect.astype(np.int32) * 257, expect),  # 16-bit values
        "i_range.tif": ((ramp * 4e6).astype(np.int32) - 10, expect),  # beyond 16 bits: min..max
    }
    for name, (a, want) in cases.items():
        Image.fromarray(a).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode in ("F", "I")
        got = np.asarray(load_rgb(tmp_path / name))
        assert got.shape == (4, 16, 3) and (got[..., 0] == got[..., 2]).all()
        assert np.abs(got[..., 0].astype(int) - want).max() <= 1, (name, got[0, :, 0], want[0])
    bad = np.array([[0.0, np.nan]], np.float32)
    Image.fromarray(bad).save(tmp_path / "nan.tif")
    with pytest.raises(ValueError, match="NaN"):
        load_rgb(tmp_path / "nan.tif")
    # EXIF orientation 6 (camera held upright): stored 8x4, shown 4x8 rotated 90 degrees clockwise
    a = np.zeros((4, 8, 3), np.uint8)
    a[:, :4] = (255, 0, 0)
    a[:, 4:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "rot.png", exif=exif)
    upright = np.rot90(a, -1)
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "rot.png")), upright)
    (tmp_path / "folder").mkdir()
    Image.fromarray(a).save(tmp_path / "folder" / "rot.png", exif=exif)
    Image.fromarray(ramp).save(tmp_path / "folder" / "f01.tif")
    rf = ImageFolderDataset(tmp_path / "folder", size=None, channels=3)
    got = {p.name: rf[i]["x"] for i, p in enumerate(rf.files)}  # the RF trainer's image folder reader
    assert got["rot.png"].shape == (3, 8, 4)
    assert torch.allclose(got["f01.tif"][0], torch.from_numpy(expect / 127.5 - 1).float(), atol=1e-6)
