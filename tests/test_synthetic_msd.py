"""ratlib.synthetic.make_msd_segmentation: the Decathlon layout, NIfTI headers, labels, determinism,
multi-modal 4D images, overwrite protection, interrupted runs and argument errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np  # a hard dependency: no skip
import pytest
from suite_rules import require

nib = require("nibabel")

import ratlib.synthetic.msd as impl  # noqa: E402
from ratlib.synthetic import make_msd_segmentation  # noqa: E402

SMALL = (24, 20, 8)


def _arrays(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def test_decathlon_layout_and_dataset_json(tmp_path: Path) -> None:
    root = make_msd_segmentation(tmp_path / "Task99", 3, SMALL, 3, seed=1, num_test=2)
    assert root == tmp_path / "Task99"
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "3D" and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "spleen"}
    assert meta["numTraining"] == 3 and meta["numTest"] == 2
    assert meta["training"][0] == {
        "image": "./imagesTr/synthetic_001.nii.gz",
        "label": "./labelsTr/synthetic_001.nii.gz",
    }
    assert meta["test"] == ["./imagesTs/synthetic_004.nii.gz", "./imagesTs/synthetic_005.nii.gz"]
    listed = {p for pair in meta["training"] for p in pair.values()} | set(meta["test"])
    on_disk = {f"./{p.relative_to(root).as_posix()}" for p in root.rglob("*.nii.gz")}
    assert listed == on_disk  # nothing more, nothing less (and no temp files left)
    assert sorted(p.name for p in root.iterdir()) == ["dataset.json", "imagesTr", "imagesTs", "labelsTr"]


def test_nifti_headers_affine_and_labels(tmp_path: Path) -> None:
    root = make_msd_segmentation(tmp_path, 2, SMALL, 4, spacing=(0.8, 0.7, 2.5))
    image = nib.load(root / "imagesTr" / "synthetic_001.nii.gz")
    label = nib.load(root / "labelsTr" / "synthetic_001.nii.gz")
    assert image.shape == label.shape == SMALL
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert np.allclose(image.affine, label.affine)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), (0.8, 0.7, 2.5))
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")  # scanner-like, as DICOM-converted CT is
    for img in (image, label):
        assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
        assert img.header.get_xyzt_units() == ("mm", "sec")
        assert np.allclose(img.header.get_zooms(), (0.8, 0.7, 2.5))
    values = _arrays(label.get_filename())
    assert set(np.unique(values).tolist()) == {0, 1, 2, 3}  # every organ class in every case
    pixels = _arrays(image.get_filename()).astype(float)
    means = [pixels[values == c].mean() for c in range(4)]
    assert means == sorted(means) and min(np.diff(means)) > 50  # each class a step brighter


def test_deterministic_bytes_and_case_independent_of_count(tmp_path: Path) -> None:
    a = make_msd_segmentation(tmp_path / "a", 2, SMALL, seed=3)
    b = make_msd_segmentation(tmp_path / "b", 4, SMALL, seed=3)
    c = make_msd_segmentation(tmp_path / "c", 2, SMALL, seed=4)
    for sub in ("imagesTr", "labelsTr"):
        for name in ("synthetic_001.nii.gz", "synthetic_002.nii.gz"):
            assert (a / sub / name).read_bytes() == (b / sub / name).read_bytes()
            assert (a / sub / name).read_bytes() != (c / sub / name).read_bytes()


def test_multimodal_cases_are_4d(tmp_path: Path) -> None:
    root = make_msd_segmentation(tmp_path, 2, SMALL, 2, modalities=("T2", "ADC"), name="Prostate")
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "4D" and meta["modality"] == {"0": "T2", "1": "ADC"}
    assert meta["labels"] == {"0": "background", "1": "liver"}
    image = nib.load(root / "imagesTr" / "prostate_001.nii.gz")
    assert image.shape == (*SMALL, 2) and image.get_data_dtype() == np.float32
    assert _arrays(root / "labelsTr" / "prostate_001.nii.gz").shape == SMALL


def test_refuses_foreign_files_and_replaces_its_own(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "dataset.json").write_text(json.dumps({"name": "Spleen", "training": []}))
    with pytest.raises(FileExistsError, match="not written by make_msd_segmentation"):
        make_msd_segmentation(real, 2, SMALL)
    assert json.loads((real / "dataset.json").read_text())["name"] == "Spleen"  # untouched

    foreign = tmp_path / "foreign"
    (foreign / "labelsTr").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros(SMALL, np.uint8), np.eye(4)), foreign / "labelsTr" / "synthetic_002.nii.gz")
    with pytest.raises(FileExistsError, match=r"1 file\(s\).*labelsTr/synthetic_002.nii.gz"):
        make_msd_segmentation(foreign, 2, SMALL)
    make_msd_segmentation(foreign, 2, SMALL, overwrite=True)
    assert impl._is_ours(foreign / "labelsTr" / "synthetic_002.nii.gz")

    ours = make_msd_segmentation(tmp_path / "ours", 4, SMALL)
    make_msd_segmentation(ours, 2, SMALL, seed=5)  # a rerun replaces its own output, stale cases removed
    assert sorted(p.name for p in (ours / "imagesTr").iterdir()) == ["synthetic_001.nii.gz", "synthetic_002.nii.gz"]
    assert json.loads((ours / "dataset.json").read_text())["generator_args"]["seed"] == 5


def test_interrupted_run_leaves_no_dataset_json_and_a_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_msd_segmentation(tmp_path, 3, SMALL)
    writes = []
    real_write = impl.write_atomic

    def failing(path: Path, data: bytes) -> None:
        writes.append(path)
        if len(writes) == 3:
            raise KeyboardInterrupt("killed")
        real_write(path, data)

    monkeypatch.setattr(impl, "write_atomic", failing)
    with pytest.raises(KeyboardInterrupt):
        make_msd_segmentation(tmp_path, 3, SMALL, seed=9)
    assert not (tmp_path / "dataset.json").exists()  # written last: its absence says "incomplete"
    assert not list(tmp_path.rglob(".*tmp-*"))
    monkeypatch.setattr(impl, "write_atomic", real_write)
    make_msd_segmentation(tmp_path, 3, SMALL, seed=9)  # its own half-written output is replaced, not refused
    assert json.loads((tmp_path / "dataset.json").read_text())["generator_args"]["seed"] == 9


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_cases": 0}, "num_cases=0"),
        ({"shape": (64, 64)}, "shape=(64, 64)"),
        ({"shape": (4, 64, 16)}, "8 to 1024 in-plane"),
        ({"num_classes": 1}, "background included"),
        ({"num_test": -1}, "num_test=-1"),
        ({"spacing": (1, 0, 1)}, "spacing="),
        ({"modalities": "CT"}, "modalities='CT'"),
        ({"name": "my task"}, "name='my task'"),
    ],
)
def test_argument_errors(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_msd_segmentation(tmp_path, **{"num_cases": 2, "shape": SMALL, **kwargs})
    assert not (tmp_path / "dataset.json").exists()


def test_install_hint_without_nibabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "nibabel", None)
    with pytest.raises(ImportError, match=r"pip install 'ratlib\[medical\]'"):
        make_msd_segmentation(tmp_path, 2, SMALL)


def test_wrapper_has_the_real_signature_and_doc() -> None:
    import inspect

    import ratlib.synthetic

    assert "Decathlon" in (ratlib.synthetic.make_msd_segmentation.__doc__ or "")
    assert list(inspect.signature(ratlib.synthetic.make_msd_segmentation).parameters)[:5] == [
        "root",
        "num_cases",
        "shape",
        "num_classes",
        "seed",
    ]
