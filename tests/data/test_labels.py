"""Label-file readers: hand-made rows, malformed files and the real public label files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import SHARED

from m3d_lit.data.sources.cq500 import CQ500_FINDINGS, CQ500_READERS, read_cq500_reads
from m3d_lit.data.sources.physionet import PHYSIONET_TYPES, read_physionet_labels
from m3d_lit.errors import InputError

REAL = SHARED / "data" / "labels"
CQ500_HEADER = ["name", "Category"] + [f"{r}:{f}" for r in CQ500_READERS for f in CQ500_FINDINGS]
SLICE_HEADER = [
    "PatientNumber",
    "SliceNumber",
    "Intraventricular",
    "Intraparenchymal",
    "Subarachnoid",
    "Epidural",
    "Subdural",
    "No_Hemorrhage",
    "Fracture_Yes_No",
]
# The real two-row header: a quoted newline in the age cell and a merged cell over the five types.
DEMOGRAPHICS_HEADER = (
    'Patient Number,"Age\n(years)",Gender,Hemorrhage type based on the radiologists diagnosis ,,,,,'
    "Fracture (yes 1/no 0),Condition on file,Note\n"
    ",,,Intraventricular,Intraparenchymal,Subarachnoid,Epidural,Subdural,,,\n"
)


def write_csv(
    path: Path, rows: list[list[str]], bom: bool = False, crlf: bool = False, final: bool = True
) -> Path:
    newline = "\r\n" if crlf else "\n"
    text = newline.join(",".join(row) for row in rows) + (newline if final else "")
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode())
    return path


def cq500_row(name: str, votes: dict[str, set[str]], category: str = "B1") -> list[str]:
    return [name, category] + [
        str(int(f in votes.get(r, set()))) for r in CQ500_READERS for f in CQ500_FINDINGS
    ]


def slice_row(patient: int, number: int, types: set[str] = frozenset(), fracture: int = 0) -> list[str]:
    cells = [str(int(k in types)) for k in PHYSIONET_TYPES]
    return [str(patient), str(number), *cells, str(int(not types)), str(fracture)]


def test_cq500_majority_keeps_each_reader_vote(tmp_path):
    rows = [
        CQ500_HEADER,
        cq500_row("CQ500-CT-1", {"R1": {"ICH", "SDH"}, "R2": {"ICH", "SDH", "BleedLocation-Left"}}, "B2"),
        cq500_row("CQ500-CT-2", {"R3": {"ICH", "Fracture"}}),
    ]
    reads = read_cq500_reads(write_csv(tmp_path / "reads.csv", rows))
    first = reads["CQ500-CT-1"]
    assert first["category"] == "B2"
    assert first["readers"]["R2"]["BleedLocation-Left"] == 1 and first["readers"]["R3"]["ICH"] == 0
    assert first["majority"]["ICH"] == first["majority"]["SDH"] == 1
    assert first["majority"]["BleedLocation-Left"] == 0
    assert sum(reads["CQ500-CT-2"]["majority"].values()) == 0


def test_cq500_every_finding_follows_two_of_three(tmp_path):
    rows = [CQ500_HEADER]
    for i, finding in enumerate(CQ500_FINDINGS):
        rows.append(cq500_row(f"two-{i}", {"R1": {finding}, "R3": {finding}}))
        rows.append(cq500_row(f"one-{i}", {"R2": {finding}}))
    reads = read_cq500_reads(write_csv(tmp_path / "reads.csv", rows))
    for i, finding in enumerate(CQ500_FINDINGS):
        assert reads[f"two-{i}"]["majority"] == {f: int(f == finding) for f in CQ500_FINDINGS}
        assert sum(reads[f"one-{i}"]["majority"].values()) == 0


@pytest.mark.parametrize(
    "variant", [{"bom": True}, {"crlf": True}, {"final": False}, {"bom": True, "crlf": True, "final": False}]
)
def test_cq500_bom_crlf_and_no_final_newline_read_the_same(tmp_path, variant):
    rows = [CQ500_HEADER, cq500_row("a", {"R1": {"ICH"}, "R2": {"ICH"}}), cq500_row("b", {})]
    plain = read_cq500_reads(write_csv(tmp_path / "plain.csv", rows))
    assert read_cq500_reads(write_csv(tmp_path / "variant.csv", rows, **variant)) == plain


def test_cq500_missing_column_names_file_and_column(tmp_path):
    drop = CQ500_HEADER.index("R2:SDH")
    rows = [[c for i, c in enumerate(row) if i != drop] for row in [CQ500_HEADER, cq500_row("a", {})]]
    path = write_csv(tmp_path / "reads.csv", rows)
    with pytest.raises(InputError, match="R2:SDH") as info:
        read_cq500_reads(path)
    assert str(path) in str(info.value)


def test_cq500_duplicate_name_gives_line(tmp_path):
    rows = [CQ500_HEADER, cq500_row("a", {}), cq500_row("b", {}), cq500_row("a", {})]
    with pytest.raises(InputError, match=r"line 4: duplicate scan name a \(first on line 2\)"):
        read_cq500_reads(write_csv(tmp_path / "reads.csv", rows))


@pytest.mark.parametrize("value", ["2", "yes", "", "1.0"])
def test_cq500_value_other_than_0_1(tmp_path, value):
    row = cq500_row("a", {})
    row[CQ500_HEADER.index("R3:MassEffect")] = value
    with pytest.raises(InputError, match=r"line 3, column R3:MassEffect: value .* is not 0 or 1"):
        read_cq500_reads(write_csv(tmp_path / "reads.csv", [CQ500_HEADER, cq500_row("b", {}), row]))


@pytest.mark.parametrize(
    ("rows", "problem"),
    [([CQ500_HEADER], "no scans"), ([], "empty"), ([CQ500_HEADER, ["a", "B1", "0"]], "line 2: 3 values")],
)
def test_cq500_empty_or_short_files(tmp_path, rows, problem):
    with pytest.raises(InputError, match=problem):
        read_cq500_reads(write_csv(tmp_path / "reads.csv", rows))


def test_missing_label_file_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_cq500_reads(tmp_path / "reads.csv")
    with pytest.raises(InputError, match="hemorrhage_diagnosis_raw_ct.csv: file not found"):
        read_physionet_labels(tmp_path)


def physionet_root(tmp_path: Path, rows: list[list[str]], **variant) -> Path:
    write_csv(tmp_path / "hemorrhage_diagnosis_raw_ct.csv", [SLICE_HEADER, *rows], **variant)
    return tmp_path


def test_physionet_patient_labels_are_any_slice(tmp_path):
    rows = [slice_row(49, 1), slice_row(49, 2, {"IPH", "EDH"}, 1), slice_row(49, 3, {"SDH"})]
    rows += [slice_row(130, 2), slice_row(130, 1)]
    labels = read_physionet_labels(physionet_root(tmp_path, rows))
    assert list(labels) == ["049", "130"]
    first = labels["049"]
    assert first["types"] == {"IVH": 0, "IPH": 1, "SAH": 0, "EDH": 1, "SDH": 1}
    assert (first["hemorrhage"], first["fracture"], first["num_slices"]) == (1, 1, 3)
    assert first["slices"][2] == {
        "IVH": 0,
        "IPH": 1,
        "SAH": 0,
        "EDH": 1,
        "SDH": 0,
        "hemorrhage": 1,
        "fracture": 1,
    }
    assert first["slices"][1]["hemorrhage"] == 0
    assert labels["130"]["hemorrhage"] == 0 and list(labels["130"]["slices"]) == [1, 2]


@pytest.mark.parametrize("variant", [{"bom": True}, {"crlf": True}, {"final": False}])
def test_physionet_bom_crlf_and_no_final_newline(tmp_path, variant):
    rows = [slice_row(50, 1, {"SAH"}), slice_row(50, 2)]
    for name in ("plain", "variant"):
        (tmp_path / name).mkdir()
    plain = read_physionet_labels(physionet_root(tmp_path / "plain", rows))
    assert read_physionet_labels(physionet_root(tmp_path / "variant", rows, **variant)) == plain


@pytest.mark.parametrize(
    ("rows", "problem"),
    [
        ([slice_row(49, 1), slice_row(49, 1)], "line 3: patient 049 slice 1 appears twice"),
        ([slice_row(49, 1), slice_row(49, 3)], r"patient 049: slice numbers are not 1..N, missing \[2\]"),
        ([slice_row(49, 0)], "line 2: slice number '0'"),
        ([slice_row(49, 1, {"IVH"})[:7] + ["1", "0"]], "line 2: No_Hemorrhage contradicts"),
        ([slice_row(49, 1)[:8] + ["2"]], "line 2, column Fracture_Yes_No: value '2' is not 0 or 1"),
        ([["x"] + slice_row(49, 1)[1:]], "line 2: patient number 'x'"),
    ],
)
def test_physionet_bad_rows(tmp_path, rows, problem):
    with pytest.raises(InputError, match=problem):
        read_physionet_labels(physionet_root(tmp_path, rows))


def test_physionet_missing_column(tmp_path):
    rows = [row[:-1] for row in [SLICE_HEADER, slice_row(49, 1)]]
    write_csv(tmp_path / "hemorrhage_diagnosis_raw_ct.csv", rows)
    with pytest.raises(InputError, match="missing column.*Fracture_Yes_No"):
        read_physionet_labels(tmp_path)


def write_demographics(root: Path, body: str, crlf: bool = False) -> None:
    text = DEMOGRAPHICS_HEADER + body
    (root / "Patient_demographics.csv").write_bytes(text.replace("\n", "\r\n" if crlf else "\n").encode())


@pytest.mark.parametrize("crlf", [False, True])
def test_physionet_demographics_wins_where_it_has_labels(tmp_path, crlf):
    rows = [slice_row(49, 1, {"IPH"}), slice_row(50, 1, {"SAH"}, 1), slice_row(51, 1)]
    root = physionet_root(tmp_path, rows)
    body = (
        "49,35,Male,0,0,0,1,0,1,Intracranial hemorrhage,\n"
        '50,20,Female,,,,,,,"Note, with a comma",\n'
        "51,61,Male,0,0,0,0,0,0,Normal,\n"
        "59,40,Male,,,,,,,No CT scan,\n"
    )
    write_demographics(root, body, crlf)
    labels = read_physionet_labels(root)
    assert list(labels) == ["049", "050", "051"]
    assert labels["049"]["types"] == {"IVH": 0, "IPH": 0, "SAH": 0, "EDH": 1, "SDH": 0}
    assert (labels["049"]["hemorrhage"], labels["049"]["fracture"]) == (1, 1)
    # Blank demographics cells keep the per-slice labels; slices themselves are never changed.
    assert labels["050"]["types"]["SAH"] == 1 and labels["050"]["fracture"] == 1
    assert labels["049"]["slices"][1]["IPH"] == 1


@pytest.mark.parametrize(
    ("body", "header", "problem"),
    [
        ("49,35,Male,0,2,0,0,0,0,,\n", DEMOGRAPHICS_HEADER, "line 4, column Intraparenchymal: value '2'"),
        (
            "49,35,Male,0,0,0,0,0,0,,\n49,35,Male,0,0,0,0,0,0,,\n",
            DEMOGRAPHICS_HEADER,
            "line 5: duplicate patient",
        ),
        (
            "49,35,Male,0,0,0,0,0,,\n",
            DEMOGRAPHICS_HEADER.replace("Epidural", "Epi"),
            "missing column.*Epidural",
        ),
    ],
)
def test_physionet_bad_demographics(tmp_path, body, header, problem):
    root = physionet_root(tmp_path, [slice_row(49, 1)])
    (root / "Patient_demographics.csv").write_text(header + body)
    with pytest.raises(InputError, match=f"Patient_demographics.csv: {problem}"):
        read_physionet_labels(root)


@pytest.mark.skipif(not REAL.is_dir(), reason="shared label files absent")
def test_real_cq500_reads_majority_counts():
    reads = read_cq500_reads(REAL / "cq500_reads.csv")
    assert len(reads) == 491 and "CQ500-CT-490" in reads
    counts = {f: sum(r["majority"][f] for r in reads.values()) for f in CQ500_FINDINGS}
    assert counts == {
        "ICH": 205,
        "IPH": 134,
        "IVH": 28,
        "SDH": 53,
        "EDH": 13,
        "SAH": 60,
        "BleedLocation-Left": 131,
        "BleedLocation-Right": 129,
        "ChronicBleed": 19,
        "Fracture": 39,
        "CalvarialFracture": 34,
        "OtherFracture": 12,
        "MassEffect": 127,
        "MidlineShift": 65,
    }


@pytest.mark.skipif(not REAL.is_dir(), reason="shared label files absent")
def test_real_physionet_patient_counts(tmp_path):
    shutil.copy(
        REAL / "physionet_hemorrhage_diagnosis_raw_ct.csv", tmp_path / "hemorrhage_diagnosis_raw_ct.csv"
    )
    labels = read_physionet_labels(tmp_path)
    assert len(labels) == 75 and "049" in labels and "130" in labels and "060" not in labels
    assert sum(r["num_slices"] for r in labels.values()) == 2814
    assert {k: sum(r["types"][k] for r in labels.values()) for k in PHYSIONET_TYPES} == {
        "IVH": 5,
        "IPH": 16,
        "SAH": 7,
        "EDH": 21,
        "SDH": 4,
    }
    assert sum(r["hemorrhage"] for r in labels.values()) == 36
    assert sum(r["fracture"] for r in labels.values()) == 22
    assert sum(r["fracture"] and not r["hemorrhage"] for r in labels.values()) == 1
