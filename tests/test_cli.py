"""The command line: each command on small generated inputs; input errors as one line; exit codes
(errors.ExitCode): 2 usage, 3 input, 4 partial failure; help on every option; a log file in run folders."""

import copy
import json

import click
import yaml
from click.testing import CliRunner

from breastfusion.cli import main
from breastfusion.config import BackboneConfig, CVConfig, RunConfig, TrainConfig, to_dict

from conftest import tiny_model_config, write_tiny_cohort


def test_synth_then_validate(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["synth", "-o", str(tmp_path / "c"), "--patients", "6", "--size", "48"])
    assert out.exit_code == 0, out.output
    out = runner.invoke(main, ["validate", str(tmp_path / "c" / "manifest.csv")])
    assert out.exit_code == 0 and "6 cases" in out.output


def test_bad_manifest_is_one_clear_error_without_traceback(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("patient_id,side,modality,path,label\nP1,L,US,missing.png,cancer\n")
    out = CliRunner().invoke(main, ["validate", str(bad)])
    assert out.exit_code == 3
    assert "Traceback" not in out.output
    assert "unknown label 'cancer'" in out.output


def test_config_prints_a_preset_row_that_round_trips():
    out = CliRunner().invoke(main, ["config", "table3", "--row", "cross-attn MM single head"])
    assert out.exit_code == 0, out.output
    (row,) = yaml.safe_load(out.output)["rows"]
    assert row["model"]["fusion"] == "cross_attention" and row["model"]["attention_heads"] == 1


def _tiny_us(tmp_path, name="US", *more):
    """(manifest, config file) of a tiny cached-mode US row (and `more` rows), ready for `experiment`."""
    manifest = write_tiny_cohort(tmp_path / "data", n_cases=12)
    model = tiny_model_config(modalities=["US"],
                              backbone=BackboneConfig(name="resnet18", weights="none", frozen="all", image_size=32))
    row = RunConfig(name=name, model=model, cv=CVConfig(folds=4, test_folds=1),
                    train=TrainConfig(mode="cached", epochs=1, batch_size=8, cache_dir=str(tmp_path / "cache")))
    rows = [row, *(edit(copy.deepcopy(row)) for edit in more)]
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"rows": [to_dict(r) for r in rows]}))
    return manifest, cfg


def test_experiment_from_a_config_file(tmp_path):
    manifest, cfg = _tiny_us(tmp_path, "tiny US")
    out = CliRunner().invoke(main, ["experiment", str(cfg), "--manifest", str(manifest), "-o",
                                    str(tmp_path / "run"), "--quiet", "--set", "train.epochs=2",
                                    "--set", "model.us_backbone.pooling=gem", "--set", "train.lr=3e-4"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "run" / "report.md").is_file()
    assert "breastfusion experiment" in (tmp_path / "run" / "command.txt").read_text()
    saved = yaml.safe_load((tmp_path / "run" / "rows" / "tiny_US" / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 2 and saved["train"]["lr"] == 3e-4
    assert saved["model"]["us_backbone"]["pooling"] == "gem" and saved["model"]["backbone"]["pooling"] == "avg"
    fit = json.loads((tmp_path / "run" / "rows" / "tiny_US" / "folds" / "fold_0" / "fit.json").read_text())
    assert len(fit["history"]) == 2
    log = (tmp_path / "run" / "breastfusion.log").read_text()
    assert "INFO breastfusion.experiment: [tiny US] cross-validating (4 folds, cached mode)" in log
    assert "tiny US fold 3: best epoch" in log and "[tiny US] patient AUC" in log
    for bad, code in (("train.nonsense=1", 3), ("train.mode=sideways", 3), ("train.lr", 2)):
        out = CliRunner().invoke(main, ["experiment", str(cfg), "--manifest", str(manifest), "-o",
                                        str(tmp_path / "bad"), "--quiet", "--set", bad])
        assert out.exit_code == code and bad.split("=")[0] in out.output.strip().splitlines()[-1], (bad, out.output)


def test_unknown_preset_or_file_is_an_error(tmp_path):
    out = CliRunner().invoke(main, ["experiment", "nonsense", "--manifest", "x.csv", "-o", str(tmp_path)])
    assert out.exit_code == 3 and "neither a preset" in out.output


def test_experiment_row_selection_and_second_image_choice(tmp_path):
    manifest = write_tiny_cohort(tmp_path / "data", n_cases=6)  # has synthesized 2D: the C-View rows stay
    args = ["experiment", "table3-cpu", "--manifest", str(manifest), "-o", str(tmp_path / "run")]
    out = CliRunner().invoke(main, args + ["--row", "single MG without MLO"])
    assert out.exit_code == 3 and "has no row 'single MG without MLO'" in out.output
    assert "drop the MLO view" not in out.output
    out = CliRunner().invoke(main, args + ["--second-image", "view", "--row", "nonsense"])
    assert out.exit_code == 3 and "single MG without MLO" in out.output  # listed among the rows


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


def test_every_command_and_option_explains_itself():
    assert main.help
    missing = [f"{' '.join(path)} {'/'.join(p.opts)}" for path, cmd in _commands(main) for p in cmd.params
               if isinstance(p, click.Option) and not (p.help or "").strip()]
    missing += [" ".join(path) for path, cmd in _commands(main) if not (cmd.help or "").strip()]
    assert not missing, missing
    for path, _ in _commands(main):  # and --help shows it, with --verbose/--quiet on every command
        out = CliRunner().invoke(main, [*path, "--help"])
        assert out.exit_code == 0 and "--verbose" in out.output and "--quiet" in out.output, (path, out.output)


def test_exit_codes_usage_input_and_partial_failure(tmp_path):
    runner = CliRunner()
    assert runner.invoke(main, ["validate", "--nonsense"]).exit_code == 2  # usage
    assert runner.invoke(main, ["nonsense-command"]).exit_code == 2
    missing = runner.invoke(main, ["validate", str(tmp_path / "nowhere.csv")])
    assert missing.exit_code == 3 and missing.output.startswith("error: ")  # input
    # one row runs, one cannot (GoogLeNet's ImageNet weights are not on this machine): outputs
    # are written and the command says so with exit code 4

    def googlenet(row):
        row.name = "GoogLeNet US"
        row.model.backbone = BackboneConfig(name="googlenet", weights=str(tmp_path / "no-such-weights.pth"),
                                            frozen="all", image_size=32)
        return row

    manifest, cfg = _tiny_us(tmp_path, "US", googlenet)
    out = runner.invoke(main, ["experiment", str(cfg), "--manifest", str(manifest), "-o", str(tmp_path / "run"),
                               "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path / "other-cache")])
    assert out.exit_code == 4, out.output
    assert "1 of 2 rows not run" in out.output and (tmp_path / "run" / "report.md").is_file()
    saved = yaml.safe_load((tmp_path / "run" / "rows" / "US" / "config.yaml").read_text())
    assert saved["train"]["device"] == "cpu" and saved["train"]["cache_dir"] == str(tmp_path / "other-cache")
    assert (tmp_path / "other-cache" / "features").is_dir()


def test_quiet_and_verbose_set_the_console_level(tmp_path):
    manifest, cfg = _tiny_us(tmp_path)
    args = ["experiment", str(cfg), "--manifest", str(manifest)]
    quiet = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "q"), "--quiet"])
    loud = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "v"), "--verbose"])
    assert quiet.exit_code == 0 and loud.exit_code == 0
    assert "cross-validating" not in quiet.output and "[US] cross-validating" in loud.output
    # the log file has the INFO lines either way
    assert "cross-validating" in (tmp_path / "q" / "breastfusion.log").read_text()


def _fake_run(folder, macro: float, rows=("single US", "concat MM"), not_run=()):
    def stat(v):
        return {"mean": v, "std": 0.01, "n": 10}

    out = []
    for name in rows:
        row = {"name": name, "backbone": "efficientnet_lite0", "mode": "partial",
               "backbones": {"US": {"name": "efficientnet_lite0", "image_size": 224, "frozen": "layer3",
                                    "pooling": "avg"}}}
        if name in not_run:
            row["not_run"] = "no weights"
        else:
            row["patient"] = {"auc": {c: stat(macro) for c in ("normal", "benign", "malignant")},
                              "macro_auc": stat(macro), "accuracy": stat(0.7)}
        out.append(row)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"rows": out}))
    return str(folder)


def test_compare_puts_runs_side_by_side_row_by_row(tmp_path):
    old = _fake_run(tmp_path / "old", 0.80, not_run=("concat MM",))
    new = _fake_run(tmp_path / "new", 0.85, rows=("single US", "concat MM", "single MG"))
    out = CliRunner().invoke(main, ["compare", old, new, "--label", "frozen", "--label", "partial",
                                    "-o", str(tmp_path / "cmp.md")])
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines == (tmp_path / "cmp.md").read_text().strip().splitlines()
    assert "macro vs frozen" in lines[0]
    us_new = next(line for line in lines if line.startswith("| single US | partial |"))
    assert "| 85.0 ± 1.0 | +5.0 |" in us_new and "US efficientnet_lite0 224 px" in us_new
    assert any(line.startswith("| concat MM | frozen |") and "not run" in line for line in lines)
    assert any(line.startswith("| single MG | frozen |") and "not in this run" in line for line in lines)
    bad = CliRunner().invoke(main, ["compare", old, new, "--label", "one"])
    assert bad.exit_code == 3 and "one per run" in bad.output
    missing = CliRunner().invoke(main, ["compare", old, str(tmp_path)])
    assert missing.exit_code == 3 and "metrics.json: not found" in missing.output
