"""mimlab.report on hand-made run folders: varying keys, last/max values, plot, and errors that say what to do."""

from __future__ import annotations

import pytest
import yaml

from mimlab.report import find_runs, main, report


def _run(folder, overrides, rows):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (folder / ".hydra" / "config.yaml").write_text("name: x\n")
    (folder / "csv").mkdir()
    keys = sorted({k for r in rows for k in r})
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (folder / "csv" / "metrics.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def sweep(tmp_path):
    for num, (ratio, depth, acc) in enumerate([(0.5, 1, 0.4), (0.75, 1, 0.6), (0.5, 8, 0.5), (0.75, 8, 0.7)]):
        _run(
            tmp_path / f"{num}_r={ratio}",
            [
                f"masking.ratio={ratio}",
                f"model.decoder.depth={depth}",
                "experiment=mae_vit_tiny_synthetic",
                "+sweep=s",
                f"data.root=/d{num}",
            ],
            [
                {"step": 0, "knn/acc1": acc + 0.1, "val/loss": 2.0},
                {"step": 9, "train/loss_epoch": 1.5},
                {"step": 9, "knn/acc1": acc, "val/loss": 1.0 + ratio},
            ],
        )
    return tmp_path


def test_table_has_the_varying_keys_and_last_values(sweep):
    result = report([sweep], x="masking.ratio", hue="model.decoder.depth")
    assert result["keys"] == ["masking.ratio", "model.decoder.depth"]  # data.root, experiment, sweep left out
    assert result["metrics"] == ["knn/acc1", "val/loss", "train/loss_epoch"]
    lines = result["markdown"].splitlines()
    assert lines[0] == "| run | masking.ratio | model.decoder.depth | knn/acc1 | val/loss | train/loss_epoch | steps |"
    assert lines[2] == "| job 0 | 0.5 | 1 | 0.4 | 1.5 | 1.5 | 10 |"
    assert lines[5] == "| job 3 | 0.75 | 8 | 0.7 | 1.75 | 1.5 | 10 |"
    assert result["plot"].name == "knn_acc1_vs_masking.ratio.png" and result["plot"].stat().st_size > 5000
    assert (sweep / "results.csv").read_text().splitlines()[1].startswith("job 0,0.5,1,0.4")


def test_max_aggregation_and_cli(sweep, tmp_path, capsys):
    main([str(sweep), "--y", "knn/acc1", "--agg", "max", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "| job 0 | 0.5 | 1 | 0.5 |" in printed and (tmp_path / "out" / "results.md").exists()


def test_errors_name_what_is_missing(sweep, tmp_path):
    with pytest.raises(KeyError, match="val/probe_acc.*available.*knn/acc1"):
        report([sweep], y=["val/probe_acc"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run folders"):
        find_runs([tmp_path / "empty"])
