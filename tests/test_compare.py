"""qmamba compare: backbones through one config's protocol, then one table of accuracy against cost and its plot."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image

from qmamba.cli import main


@pytest.mark.slow  # 40 s on 2 cores of a Zen 3 EPYC: two tiny fits and tests, two measuring processes
def test_compare_writes_the_table_and_plot_and_a_rerun_reuses_every_finished_split(workdir, capsys):
    root, config = workdir
    out = root / "runs" / "compare"
    args = ["compare", "--config", str(config), "--models", "qmamba_test", "timm:test_vit", "--splits", "1",
            "--rounds", "1", "--block-seconds", "0.1", "--out", str(out)]
    main(args)
    table = pd.read_csv(out / "compare.csv")
    assert table["model"].tolist() == ["qmamba_test", "timm:test_vit"]
    assert table.loc[0, "params"] == 399_056 and table.loc[1, "params"] == 306_240  # backbones, no head
    for column in ("gflops", "inference", "training", "peak_mib", "tiny_kadid_srcc", "tiny_kadid_plcc", "avg_srcc"):
        assert table[column].notna().all(), column
    assert (table["gflops"] > 0).all() and (table["inference"] > table["training"]).all()
    assert (table["inference_min"] <= table["inference"]).all() and (table["inference"] <= table["inference_max"]).all()
    markdown = (out / "compare.md").read_text()
    assert "32x32 images, batch 8" in markdown and "one multiply-add = one FLOP" in markdown
    assert "| `qmamba_test` | 0.40 |" in markdown and "| `timm:test_vit` | 0.31 |" in markdown
    with Image.open(out / "compare.png") as plot:
        assert plot.format == "PNG" and plot.width > 800
    assert markdown in capsys.readouterr().out

    checkpoint = out / "qmamba_test" / "split_00" / "checkpoints" / "best.ckpt"
    trained_at = checkpoint.stat().st_mtime_ns
    main(args)  # every (model, split) finished: nothing trains again
    assert checkpoint.stat().st_mtime_ns == trained_at
    assert pd.read_csv(out / "compare.csv")["tiny_kadid_srcc"].tolist() == table["tiny_kadid_srcc"].tolist()


@pytest.mark.parametrize("models,message", [
    (["qmamba_test", "swin_tiny"], "--models: unknown model 'swin_tiny'"),
    (["timm:swin_tiny"], "unknown timm model 'swin_tiny' in 'timm:swin_tiny'; did you mean"),
    (["qmamba_test", "qmamba_test"], "--models names a backbone twice"),
])
def test_compare_refuses_bad_model_names_in_one_line_before_any_run(workdir, capsys, models, message):
    root, config = workdir
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--config", str(config), "--models", *models, "--out", str(root / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (root / "out").exists() and not (root / "runs").exists()
