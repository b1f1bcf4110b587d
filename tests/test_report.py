"""`airgpu report EXECUTED.ipynb [--png FILE] [--json]` on a notebook from a real run."""

from __future__ import annotations

import io
import json

import nbformat
import pytest

from airgpu_nb.cli import main
from airgpu_nb.run import execute
from conftest import write_notebook

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    source = write_notebook(folder / "src.ipynb", "import time\ntime.sleep(1.2)",
                            "total = sum(range(10))", parameters="n = 1")
    output = folder / "out" / "run.ipynb"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRGPU_TELEMETRY_INTERVAL", "0.2")
        mp.delenv("AIRGPU_PUSHGATEWAY_URL", raising=False)
        execute(source, output)
    return output


def test_table_has_a_row_per_code_cell_with_durations(executed, capsys):
    assert main(["report", str(executed)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    nb = nbformat.read(executed, as_version=4)
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["cell", "In", "duration"]
    rows = lines[2:lines.index("")]
    code = [(i, c) for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    assert len(rows) == len(code) == 3  # parameters, sleep, sum
    for row, (index, cell) in zip(rows, code, strict=True):
        fields = row.split()
        assert fields[0] == str(index) and fields[1] == f"[{cell.execution_count}]"
        seconds = cell.metadata["airgpu"]["telemetry"]["duration_s"]
        assert fields[2] == f"{seconds:.2f}" and fields[3] == "s"
    sleep_row = next(r for r in rows if r.endswith("import time"))
    assert float(sleep_row.split()[2]) >= 1.2
    assert "no GPU data" in out and "GPU: utilisation mean -" in out
    assert "run:" in out and "samples every 0.2 s" in out


def test_json_is_one_object_matching_the_notebook(executed, capsys):
    assert main(["report", str(executed), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    data = json.loads(out)
    nb = nbformat.read(executed, as_version=4)
    assert data["summary"] == dict(nb.metadata["airgpu"]["telemetry"]["summary"])
    assert data["interval_s"] == 0.2 and data["gpu_available"] is False
    assert [c["index"] for c in data["cells"]] == [
        i for i, c in enumerate(nb.cells) if c.cell_type == "code"]
    slow = next(c for c in data["cells"] if c["source"] == "import time")
    assert slow["duration_s"] >= 1.2 and slow["samples"] >= 4
    assert data["notebook"] == str(executed) and "png" not in data


def test_png_is_a_real_image(executed, tmp_path, capsys):
    from matplotlib.image import imread

    png = tmp_path / "plots" / "run.png"
    assert main(["report", str(executed), "--png", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 5000
    pixels = imread(png)
    assert pixels.ndim >= 2 and pixels.shape[0] == 550 and pixels.shape[1] == 1000
    assert pixels.std() > 0.01  # something was drawn, not a blank canvas


def test_png_is_report_plot_of_the_samples_with_a_mark_per_cell(executed, tmp_path):
    """`airgpu report --png` draws with report.plot(), the function %%airgpu profile uses too;
    each code cell's start is a labelled mark."""
    from matplotlib.image import imread

    from airgpu_nb import report

    png = tmp_path / "run.png"
    result = report.report(executed, png=png)
    _, telemetry = report.load(executed)
    nb = nbformat.read(executed, as_version=4)
    marks = report.cell_marks(result)
    assert [m["label"] for m in marks] == [
        f"[{c.execution_count}]" for c in nb.cells if c.cell_type == "code"]
    assert [m["t"] for m in marks] == sorted(m["t"] for m in marks)
    drawn = png.read_bytes()
    assert drawn == report.plot(telemetry["samples"], marks, title=executed.name)
    assert drawn != report.plot(telemetry["samples"], title=executed.name)  # marks are drawn
    small = report.plot(telemetry["samples"], marks, size=(6.4, 4.0), dpi=80)
    assert imread(io.BytesIO(small)).shape[:2] == (320, 512)


def test_a_notebook_without_telemetry_is_one_clear_error(tmp_path, capsys):
    plain = write_notebook(tmp_path / "plain.ipynb", "x = 1")
    png = tmp_path / "never.png"
    assert main(["report", str(plain), "--png", str(png)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert "no airgpu telemetry" in err and "plain.ipynb" in err
    assert not png.exists()


def test_a_missing_notebook_is_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path / "gone.ipynb"), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "not found" in err
