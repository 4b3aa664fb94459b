"""The `breastfusion` command line: parses, calls, prints. No logic a test would want."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
import yaml

from . import logs
from .allocator import reuse_freed_memory
from .choices import RUNTIMES
from .errors import BreastFusionError, PartialFailure
from .files import STORAGE_ERRNOS, storage_error, write_text
from .locks import RunLock

SECRET_OPTIONS = ("--pseudonymise-salt",)  # whoever holds the salt can re-identify the pseudonyms


def _command_line() -> str:
    """The command as typed (recorded with every result), the values of SECRET_OPTIONS masked."""
    args = list(click.get_current_context().meta.get("breastfusion.argv", sys.argv[1:]))
    for i, arg in enumerate(args):
        if arg in SECRET_OPTIONS and i + 1 < len(args):
            args[i + 1] = "***"
        elif arg.split("=", 1)[0] in SECRET_OPTIONS and "=" in arg:
            args[i] = arg.split("=", 1)[0] + "=***"
    return "breastfusion " + " ".join(shlex.quote(a) for a in args)


def _quiet() -> bool:
    """--quiet on the running command: no progress bars, warnings only."""
    return bool(click.get_current_context().meta.get("breastfusion.quiet", False))


class _Logged:
    """Takes --verbose / --quiet and runs with the console log at that level (mixed into click's
    Command and Group)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["-v", "--verbose"], is_flag=True, help="Log DEBUG lines too."),
            click.Option(["-q", "--quiet"], is_flag=True, help="Warnings and errors only; no progress bars."),
        ]

    def invoke(self, ctx):
        # a group's flags hold for the commands under it (ctx.meta is shared down the chain)
        verbose = ctx.params.pop("verbose", False) or ctx.meta.get("breastfusion.verbose", False)
        quiet = ctx.params.pop("quiet", False) or ctx.meta.get("breastfusion.quiet", False)
        ctx.meta["breastfusion.verbose"], ctx.meta["breastfusion.quiet"] = verbose, quiet
        with logs.console(logs.level_of(verbose, quiet)):
            return super().invoke(ctx)


class _Command(_Logged, click.Command):
    """Every command takes --verbose / --quiet."""


class _SubGroup(_Logged, click.Group):
    """Commands grouped under one name (`cache list`, `cache prune`): the group and each of its
    commands take --verbose / --quiet."""

    command_class = _Command


class _Group(click.Group):
    """Prints the project's own errors as one line (traceback only with --debug) and exits
    with the error's code (errors.ExitCode: 3 input, 4 partial failure; click's usage errors 2)."""

    command_class = _Command

    def parse_args(self, ctx, args):
        ctx.meta["breastfusion.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BreastFusionError as exc:
            if ctx.params.get("debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(int(exc.exit_code))
        except OSError as exc:  # no room to write outside files.atomic_path (a folder, the log file)
            if ctx.params.get("debug") or exc.errno not in STORAGE_ERRNOS:
                raise
            error = storage_error(exc.filename, exc)
            click.echo(f"error: {error}", err=True)
            sys.exit(int(error.exit_code))


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="breastfusion")
def main(debug: bool) -> None:
    """Patient-level breast cancer triage from mammography and ultrasound.

    Exit codes: 0 done; 1 unexpected error (a bug: please report it with --debug); 2 usage
    error; 3 an input cannot be used (manifest, config, image, weights), the run folder is in use,
    or no room to write; 4 outputs written but part of the work not done (rows not run, patients
    not predicted)."""
    reuse_freed_memory()  # CPU training and inference run up to 2x faster (see allocator.py)


def _compute_options(f):
    """--device and --cache-dir, for every command that computes."""
    f = click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                     help="Preprocessing and feature cache (default: the config's train.cache_dir, "
                          ".cache/breastfusion).")(f)
    return click.option("--device", default=None,
                        help="cpu, cuda, cuda:N or auto (default: the config's train.device, auto).")(f)


@main.command()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--patients", default=300, show_default=True, help="Number of patients to generate.")
@click.option("--size", default=128, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same cohort).")
def synth(out_dir: str, patients: int, size: int, seed: int) -> None:
    """Generate the synthetic cohort (images + manifest.csv + lesions.csv)."""
    from .datasets.synthetic import SynthConfig, generate_cohort

    records = generate_cohort(out_dir, SynthConfig(n_patients=patients, image_size=size, seed=seed),
                              progress=not _quiet())
    click.echo(f"{len(records)} images of {patients} patients -> {Path(out_dir) / 'manifest.csv'}")


@main.command()
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="Manifest CSV to write.")
@click.option("--labels", type=click.Path(dir_okay=False, exists=True), default=None,
              help="CSV with patient_id, side, label.")
@click.option("--pseudonymise-salt", default=None, help="Replace patient ids by salted hashes.")
def ingest(root: str, out_csv: str, labels: str | None, pseudonymise_salt: str | None) -> None:
    """Walk a folder of DICOM (and PNG/JPEG/PGM) files into a manifest; print a summary."""
    from .ingest.folder import ingest_folder, write_ingest

    result = ingest_folder(root, labels_csv=labels, pseudonymise_salt=pseudonymise_salt, progress=not _quiet())
    manifest, skipped = write_ingest(result, out_csv)
    click.echo(result.summary())
    click.echo(f"manifest: {manifest}  skipped files: {skipped}")


@main.command("public")
@click.argument("name", type=click.Choice(["busi", "cdd-cesm", "mias"]))
@click.argument("root", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="Manifest CSV to write.")
def public_cmd(name: str, root: str, out_csv: str) -> None:
    """Manifest of a public dataset in its official layout (BUSI, CDD-CESM, mini-MIAS)."""
    from .datasets.public import load_public
    from .records import Manifest, write_manifest

    records = load_public(name, root)
    path = write_manifest(records, out_csv)
    m = Manifest(records)
    click.echo(f"{name}: {len(records)} images, {len(m.cases())} cases, classes {m.class_counts()} -> {path}")


@main.command()
@click.option("--mg", "mg_name", type=click.Choice(["cdd-cesm", "mias"]), default="cdd-cesm", show_default=True,
              help="The mammography dataset whose breasts are paired with BUSI images.")
@click.option("--mg-root", required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder of the mammography dataset, in its official layout.")
@click.option("--busi-root", required=True, type=click.Path(file_okay=False, exists=True),
              help="Folder of the BUSI dataset, in its official layout.")
@click.option("-o", "--out", "out_csv", required=True, type=click.Path(dir_okay=False), help="Manifest CSV to write.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the pairing.")
@click.option("--keep-mg-only", is_flag=True, help="Keep breasts left without a US image (MG-only cases).")
def virtual(mg_name: str, mg_root: str, busi_root: str, out_csv: str, seed: int, keep_mg_only: bool) -> None:
    """Virtual MG+US cohort: each MG breast paired with BUSI images of its class (read docs/virtual-cohort.md)."""
    from .datasets.public import load_public
    from .datasets.virtual import build_virtual_cohort

    cohort = build_virtual_cohort(load_public(mg_name, mg_root), load_public("busi", busi_root), seed=seed,
                                  keep_mg_only=keep_mg_only)
    path = cohort.write(out_csv)
    click.echo(json.dumps(cohort.report, indent=1, sort_keys=True))
    click.echo(f"manifest: {path}")


@main.command("contact-sheet")
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_png", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("-n", "count", default=16, show_default=True, help="Images to show (a seeded sample).")
@click.option("--modality", type=click.Choice(["MG", "US", "all"]), default="all", show_default=True,
              help="Which images to sample.")
@click.option("--size", default=224, show_default=True, help="Side of the preprocessed image in pixels.")
@click.option("--colour", type=click.Choice(["reject", "grey"]), default="reject", show_default=True,
              help="Colour (Doppler) ultrasound: refuse it, or convert it to grey.")
@click.option("--seed", default=0, show_default=True, help="Random seed of the sample.")
@click.option("--us-overlays", is_flag=True,
              help="Mask and inpaint calipers and text drawn on ultrasound images (preprocess.us_overlays).")
def contact_sheet_cmd(manifest: str, out_png: str, count: int, modality: str, size: int, colour: str,
                      seed: int, us_overlays: bool) -> None:
    """Before/after preprocessing of a sample of a manifest's images, as one PNG to check by eye."""
    from .preprocess.contact_sheet import contact_sheet, sample_images
    from .preprocess.pipeline import Preprocessor
    from .records import read_manifest

    m = read_manifest(manifest, require_labels=False)
    records = [r for r in m.records if modality == "all" or r.modality.value == modality]
    chosen = set(sample_images([r.path for r in records], count, seed))
    items = [(r.path, r.modality, r.side) for r in records if r.path in chosen]
    path = contact_sheet(items, Preprocessor(size=size, colour=colour, us_overlays=us_overlays), out_png)
    click.echo(f"contact sheet of {len(items)} images: {path}")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Refuse image paths outside this folder.")
def validate(manifest: str, data_root: str | None) -> None:
    """Validate a manifest and print its summary."""
    from .records import read_manifest

    m = read_manifest(manifest, data_root=data_root)
    cases = m.cases()
    click.echo(f"{manifest}: {len(m)} images, {len(cases)} cases, classes {m.class_counts()}")


@main.command("config")
@click.argument("preset_name", required=False)
@click.option("--row", default=None, help="Only this row (by name).")
@click.option("--write", "write_dir", default=None, type=click.Path(file_okay=False),
              help="Write every preset (or PRESET_NAME only) as DIR/NAME.yaml instead of printing; "
                   "configs/ in the repository is made this way.")
def config_cmd(preset_name: str | None, row: str | None, write_dir: str | None) -> None:
    """Print the YAML of a preset's rows (demo, table3, table3-cpu, table3-cpu-frozen128,
    table3-cpu-partial, table3-cpu-mg128), or write them."""
    from .config import to_dict
    from .presets import PRESETS, preset, preset_yaml

    if write_dir is not None:
        for name in [preset_name] if preset_name else list(PRESETS):
            path = write_text(Path(write_dir) / f"{name}.yaml", preset_yaml(name))
            click.echo(f"{name} -> {path}")
        return
    if preset_name is None:
        raise click.UsageError("give a PRESET_NAME, or --write DIR")
    rows = preset(preset_name)
    if row is not None:
        rows = [r for r in rows if r.name == row]
        if not rows:
            raise BreastFusionError(f"preset {preset_name!r} has no row {row!r}")
    click.echo(yaml.safe_dump({"rows": [to_dict(r) for r in rows]}, sort_keys=False), nl=False)


def _rows_from_file(spec: str):
    """The rows of a YAML config file (one RunConfig, or {rows: [...]})."""
    from .config import RunConfig, from_dict
    from .presets import PRESETS

    path = Path(spec)
    if not path.is_file():
        raise BreastFusionError(f"{spec}: neither a preset ({', '.join(PRESETS)}) nor a config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise BreastFusionError(f"{path}: not a readable YAML config ({str(exc).splitlines()[0]})") from None
    items = data["rows"] if isinstance(data, dict) and "rows" in data else [data]
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BreastFusionError(f"{path}: a config is a mapping of keys, or {{rows: [mapping, ...]}}")
    return [from_dict(RunConfig, item).validate() for item in items]


@main.command()
@click.argument("config")
@click.option("--manifest", required=True, type=click.Path(dir_okay=False),
              help="Manifest CSV (from ingest, public or virtual) with labels.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run folder (resumable: completed folds are not rerun).")
@click.option("--epochs", type=int, default=None, help="Override every row's epochs.")
@click.option("--folds", type=int, default=None, help="Override every row's number of folds.")
@click.option("--second-image", type=click.Choice(["auto", "kind", "view"]), default="auto", show_default=True,
              help="Presets only: the 'without second image' rows drop synthesized 2D (kind) or the MLO view "
                   "(view); auto picks kind when the manifest has synthesized 2D images, else view.")
@click.option("--row", "row_names", multiple=True, help="Run only these rows (by name; repeatable).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a config field of every row, e.g. --set train.lr=3e-4 --set "
                   "model.us_backbone.image_size=260 (repeatable; saved in each row's config.yaml).")
@click.option("--data-root", type=click.Path(file_okay=False), default=None,
              help="Refuse manifest image paths outside this folder.")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many folds at once, each in its own process (and on its own GPU when "
                   "several are present); results are those of --jobs 1.")
@click.option("--bootstrap", "resamples", type=click.IntRange(min=100), default=2000, show_default=True,
              help="Bootstrap resamples of the patients for the report's 95% intervals.")
@click.option("--bootstrap-seed", type=int, default=0, show_default=True,
              help="Seed of the bootstrap resampling (the intervals are reproduced exactly).")
@_compute_options
def experiment(config: str, manifest: str, out_dir: str, epochs: int | None, folds: int | None,
               second_image: str, row_names: tuple[str, ...], settings: tuple[str, ...], data_root: str | None,
               jobs: int, resamples: int, bootstrap_seed: int, device: str | None, cache_dir: str | None) -> None:
    """Cross-validate every row of CONFIG (a preset name or a YAML file) on MANIFEST."""
    from .evaluation.intervals import Bootstrap
    from .experiment import run_experiment
    from .presets import PRESETS, preset, second_image_of
    from .records import read_manifest

    rows = None if config in PRESETS else _rows_from_file(config)  # a bad file fails before the manifest is read
    m = read_manifest(manifest, data_root=data_root)
    if rows is None:
        if second_image == "auto":
            second_image = second_image_of(m)
            if second_image == "view":
                click.echo("no synthesized 2D mammograms in the manifest: the 'without second image' rows drop "
                           "the MLO view instead of C-View (--second-image to choose)")
        rows = preset(config, second_image)
    if row_names:
        unknown = sorted(set(row_names) - {r.name for r in rows})
        if unknown:
            raise BreastFusionError(f"{config} has no row {unknown[0]!r}; rows: {', '.join(r.name for r in rows)}")
        rows = [r for r in rows if r.name in row_names]
    for r in rows:
        if epochs is not None:
            r.train.epochs = epochs
        if folds is not None:
            r.cv.folds = folds
        _apply(r, settings, device, cache_dir)
    metrics = run_experiment(m, rows, out_dir, title=f"breastfusion: {config}", command=_command_line(),
                             progress=not _quiet(), jobs=jobs, bootstrap=Bootstrap(resamples, bootstrap_seed))
    if "helper_rank" in metrics:  # torchrun: rank 0 reports
        return
    click.echo(f"report: {Path(out_dir) / 'report.md'}")
    reasons = [r["not_run"] for r in metrics["rows"] if "not_run" in r]
    if reasons and len(reasons) == len(metrics["rows"]):
        raise BreastFusionError(f"no row could run; first reason: {reasons[0]}")
    if reasons:
        raise PartialFailure(f"{len(reasons)} of {len(metrics['rows'])} rows not run (see the report); "
                             f"first reason: {reasons[0]}")


def _apply(row, settings: tuple[str, ...], device: str | None, cache_dir: str | None):
    """--set KEY=VALUE, --device and --cache-dir on one row, then validation."""
    from .config import override

    for item in settings:
        key, eq, value = item.partition("=")
        if not eq:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        override(row, key.strip(), value)
    if device is not None:
        row.train.device = device
    if cache_dir is not None:
        row.train.cache_dir = cache_dir
    return row.validate()


@main.command()
@click.argument("row_dir", type=click.Path(file_okay=False, exists=True))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder.")
@click.option("--malignant-sensitivity", default=0.95, show_default=True,
              help="Target malignant sensitivity of the recall threshold (chosen on the test splits).")
@click.option("--normal-specificity", default=0.95, show_default=True,
              help="Target specificity of the routine (normal) call against abnormal patients.")
@click.option("--onnx", is_flag=True, help="Also the networks as ONNX graphs (for predict --runtime onnx).")
@click.option("--int8", is_flag=True,
              help="Also int8 backbone graphs (static quantisation; predict --runtime onnx-int8), calibrated on "
                   "training images of the folds; implies --onnx, needs --calibration-manifest.")
@click.option("--calibration-manifest", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The manifest the row was trained on (its training images calibrate the int8 graphs).")
@click.option("--calibration-images", default=64, show_default=True, type=click.IntRange(min=1),
              help="Calibration images per int8 backbone graph.")
def export(row_dir: str, out_dir: str, malignant_sensitivity: float, normal_specificity: float, onnx: bool,
           int8: bool, calibration_manifest: str | None, calibration_images: int) -> None:
    """Make a model bundle from one cross-validated row (RUN/rows/NAME) of an experiment."""
    from .predict.bundle import export_bundle, load_bundle

    if int8 and calibration_manifest is None:
        raise click.UsageError("--int8 needs --calibration-manifest (the manifest the row was trained on)")
    path = export_bundle(row_dir, out_dir, malignant_sensitivity, normal_specificity, command=_command_line())
    if onnx or int8:
        _export_onnx(path, row_dir, calibration_manifest if int8 else None, calibration_images)
    bundle = load_bundle(path)  # what predict will load: checked now
    pts = bundle.points
    click.echo(f"bundle {path}: {bundle.config.name}, {len(bundle.nets)} fold networks, temperatures "
               + ", ".join(f"{t:.2f}" for t in bundle.temperatures))
    click.echo(f"operating points: malignant threshold {pts.malignant_threshold}, normal threshold "
               f"{pts.normal_threshold} {pts.note}".rstrip())
    for cohort, figures in bundle.meta.operating_point_evidence.items():
        click.echo(f"on the {cohort} ({figures['n']} patients; 95% intervals, stratified bootstrap):")
        for key, label in (("malignant_sensitivity", "recall call: sensitivity for malignant"),
                           ("malignant_specificity", "recall call: specificity"),
                           ("normal_sensitivity", "routine call: share of normals ruled out"),
                           ("normal_specificity", "routine call: specificity against abnormal"),
                           ("recall_share", "patients to recall"), ("routine_share", "patients to routine"),
                           ("review_share", "patients to review")):
            f = figures[key]
            click.echo(f"  {label}: {100 * f['value']:.1f}% [{100 * f['low']:.1f}, {100 * f['high']:.1f}]")


def _export_onnx(path: Path, row_dir: str, calibration_manifest: str | None, images: int) -> None:
    """export --onnx [--int8]: the graphs, and what int8 changes on the validation folds."""
    from .predict.int8 import export_int8
    from .predict.onnx import export_onnx
    from .records import read_manifest

    export_onnx(path)  # logs what it wrote (the console shows INFO lines)
    if calibration_manifest is None:
        return
    int8 = export_int8(path, row_dir, read_manifest(calibration_manifest), images)
    change = int8["auc_change"]
    click.echo(f"int8 against fp32 on the validation folds ({change['patients']} patients): macro AUC "
               f"{change['auc_fp32']['macro']:.4f} -> {change['auc_int8']['macro']:.4f}, malignant AUC "
               f"{change['auc_fp32']['malignant']:.4f} -> {change['auc_int8']['malignant']:.4f}; largest probability "
               f"change {change['largest_probability_change']:.4f}; triage class changed for "
               f"{change['triage_changed']}, decision for {change['decision_changed']} patient(s)")


def _input_manifest(input_path: str, work: Path, salt: str | None, progress: bool):
    """(manifest, files skipped at ingest) from a manifest CSV, or by ingesting a folder."""
    from .ingest.folder import ingest_folder, write_ingest
    from .records import read_manifest

    path = Path(input_path)
    if path.is_file():
        return read_manifest(path, require_labels=False), []
    result = ingest_folder(path, pseudonymise_salt=salt, progress=progress)
    click.echo(result.summary())
    manifest_csv, _ = write_ingest(result, work / "manifest.csv")
    return read_manifest(manifest_csv, require_labels=False), result.skipped


@main.command()
@click.argument("input_path", type=click.Path(exists=True))
@click.option("--model", "bundle_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="A bundle made by `breastfusion export`.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Prediction folder (predictions, reports, heatmaps, worklist, log).")
@click.option("--no-heatmaps", is_flag=True, help="Skip Grad-CAM (faster).")
@click.option("--save-arrays", is_flag=True, help="Also write each heatmap as .npy.")
@click.option("--pseudonymise-salt", default=None, help="Replace patient ids by salted hashes (folder input).")
@click.option("--cache-dir", default=".cache/breastfusion", show_default=True, type=click.Path(file_okay=False),
              help="Preprocessing cache of the input images.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU if any).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
              help="PyTorch, or the bundle's ONNX graphs on ONNX Runtime (CPU; export --onnx / --int8): "
                   "same pipeline and outputs, no heatmaps.")
def predict(input_path: str, bundle_dir: str, out_dir: str, no_heatmaps: bool, save_arrays: bool,
            pseudonymise_salt: str | None, cache_dir: str, device: str, runtime: str) -> None:
    """Probabilities, triage class, decision, heatmaps and reports for new patients.

    INPUT_PATH is a DICOM study folder, a folder of patient images (see `ingest`) or a manifest CSV."""
    from .predict.bundle import load_bundle
    from .predict.run import predict_batch

    bundle = load_bundle(bundle_dir, networks=runtime == "torch")
    out = Path(out_dir)
    with RunLock(out, _command_line()), logs.log_to(out):  # one writer per output folder
        manifest, skipped = _input_manifest(input_path, out, pseudonymise_salt, progress=not _quiet())
        pred = predict_batch(manifest, bundle, out, cache_dir=cache_dir, heatmaps=not no_heatmaps, device=device,
                             progress=not _quiet(), save_arrays=save_arrays, skipped_at_ingest=skipped,
                             command=_command_line(), runtime=runtime, locked=True)
    counts = pred.patients["decision"].value_counts().to_dict()
    click.echo(f"{len(pred.patients)} patients: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if pred.skipped:
        click.echo("not predicted: " + ", ".join(f"{v} {k}" for k, v in pred.skipped.items()))
    if pred.failed:
        click.echo(f"failed: {len(pred.failed)} patient(s) (reasons in predictions.json)")
    notes = pred.note_counts()
    if notes:
        click.echo("preprocessing: " + "; ".join(f"{n} image(s): {reason}" for reason, n in notes.items()))
    click.echo(f"worklist: {out / 'worklist.html'}  reports: {out / 'reports'}")
    unused = [f"{n} {k}" for k, n in pred.skipped.items()]
    if pred.failed:
        unused.append(f"{len(pred.failed)} patient(s) failed")
    if pred.refused:
        unused.append(f"{len(pred.refused)} image(s) refused by preprocessing")
    if skipped:
        unused.append(f"{len(skipped)} file(s) skipped at ingest")
    if unused:
        raise PartialFailure("not every input was used: " + "; ".join(unused) + " (see predictions.json)")


@main.command("serve")
@click.option("--model", "bundle_dir", required=True, type=click.Path(file_okay=False, exists=True),
              help="A bundle made by `breastfusion export` (loaded once, at start).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; the default answers this machine only (put a proxy with TLS and "
                   "authentication in front before opening it to a network).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="TCP port.")
@click.option("--max-upload-mb", default=512.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body; a bigger one gets 413 before it is read whole.")
@click.option("--max-unpacked-mb", default=2048.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest total size of a study's files once unpacked (zip bomb guard).")
@click.option("--max-files", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Most files in one study (zip members and uploaded files together).")
@click.option("--max-queue", default=4, show_default=True, type=click.IntRange(min=0),
              help="Studies that may wait behind the one being predicted; more get 503 busy.")
@click.option("--upload-timeout", default=300.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds an upload may take; a slower one gets 408.")
@click.option("--tmp-dir", default=None, type=click.Path(file_okay=False),
              help="Where each request's temporary folder goes (default: the system's temporary folder).")
@click.option("--no-heatmaps", is_flag=True, help="Skip Grad-CAM (faster answers; reports without overlays).")
@click.option("--pseudonymise-salt", default=None, help="Replace patient ids by salted hashes in every answer.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto (the GPU if any).")
@click.option("--runtime", type=click.Choice(RUNTIMES), default="torch", show_default=True,
              help="As predict --runtime: the bundle's ONNX graphs on ONNX Runtime (CPU), no heatmaps.")
def serve_cmd(bundle_dir: str, host: str, port: int, max_upload_mb: float, max_unpacked_mb: float, max_files: int,
              max_queue: int, upload_timeout: float, tmp_dir: str | None, no_heatmaps: bool,
              pseudonymise_salt: str | None, device: str, runtime: str) -> None:
    """Serve `predict` over HTTP: POST a study (a zip, or DICOM/image files) to /predict and get
    predictions.json with the patients' HTML reports; GET /health. See serve.py for the details."""
    import uvicorn

    from .serve import Limits, create_app

    limits = Limits(max_upload_mb=max_upload_mb, max_unpacked_mb=max_unpacked_mb, max_files=max_files,
                    max_queue=max_queue, upload_timeout_s=upload_timeout)
    app = create_app(bundle_dir, limits=limits, tmp_root=tmp_dir, heatmaps=not no_heatmaps, device=device,
                     pseudonymise_salt=pseudonymise_salt, command=_command_line(), runtime=runtime)
    bundle = app.state.service.bundle
    click.echo(f"serving {bundle.version} ({runtime} runtime) on http://{host}:{port} (POST /predict, GET /health); "
               "Ctrl+C stops")
    uvicorn.run(app, host=host, port=port, workers=1, log_level="warning" if _quiet() else "info")


@main.command()
@click.argument("row_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--manifest", required=True, type=click.Path(dir_okay=False, exists=True),
              help="The manifest the row was trained on.")
@click.option("--lesions", type=click.Choice(["busi", "mias", "synthetic"]), required=True,
              help="Lesion annotations: BUSI mask files, mini-MIAS Info.txt circles, or a synthetic lesions.csv.")
@click.option("--mias-root", type=click.Path(file_okay=False, exists=True), default=None,
              help="mini-MIAS folder (with Info.txt), for --lesions mias.")
@click.option("--lesions-csv", type=click.Path(dir_okay=False, exists=True), default=None,
              help="The synthetic cohort's lesions.csv, for --lesions synthetic.")
@click.option("--modality", type=click.Choice(["US", "MG"]), default=None,
              help="Which images to score (default: US for busi, MG for mias; required for synthetic).")
@click.option("--target", type=click.Choice(["true", "abnormal"]), default="true", show_default=True,
              help="Explain the true class, or the evidence against normal (benign or malignant).")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for localisation.md, localisation.json and examples.png.")
@click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
              help="Preprocessing cache (default: the row's train.cache_dir).")
def localise(row_dir: str, manifest: str, lesions: str, mias_root: str | None, lesions_csv: str | None,
             modality: str | None, target: str, out_dir: str, cache_dir: str | None) -> None:
    """Grad-CAM localisation of a cross-validated row on annotated lesions, against a centre prior."""
    from .explain.folds import busi_lesions, examples_figure, explain_row, mias_circles, synthetic_lesions
    from .explain.localisation import summarize
    from .records import read_manifest
    from .vocab import Modality

    if lesions == "mias" and mias_root is None:
        raise BreastFusionError("--lesions mias needs --mias-root (the folder with Info.txt)")
    if lesions == "synthetic" and (lesions_csv is None or modality is None):
        raise BreastFusionError("--lesions synthetic needs --lesions-csv and --modality")
    if lesions == "busi":
        source, default = busi_lesions(), "US"
    elif lesions == "mias":
        source, default = mias_circles(mias_root), "MG"
    else:
        source, default = synthetic_lesions(lesions_csv), modality
    modality = Modality.parse(modality or default)
    items = explain_row(row_dir, read_manifest(manifest), modality, source, target=target, progress=not _quiet(),
                        cache_dir=cache_dir)
    if not items:
        raise BreastFusionError(f"no annotated benign/malignant {modality.value} image in the row's validation folds")
    rows = summarize(e.score for e in items)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = ["| class | images | Grad-CAM pointing hit rate | centre prior hit rate | Grad-CAM energy inside "
             "| centre prior energy inside | lesion area share |", "|" + "---|" * 7]
    for r in rows:
        table.append(f"| {r['class']} | {r['n']} | {r['gradcam_hit_rate']:.1%} | {r['prior_hit_rate']:.1%} | "
                     f"{r['gradcam_energy']:.1%} | {r['prior_energy']:.1%} | {r['lesion_fraction']:.1%} |")
    write_text(out / "localisation.md", "\n".join(table) + "\n")
    write_text(out / "localisation.json", json.dumps({"command": _command_line(), "target": target, "rows": rows,
                                                      "images": [vars(e.score) for e in items]}, indent=1))
    examples_figure(items, out / "examples.png")
    click.echo("\n".join(table))
    click.echo(f"-> {out / 'localisation.md'}, {out / 'examples.png'}")


@main.command()
@click.option("-o", "--out", "out_dir", default="runs/demo", show_default=True, type=click.Path(file_okay=False),
              help="Run folder (the synthetic cohort goes in its cohort/ subfolder).")
@click.option("--patients", default=300, show_default=True, help="Patients of the synthetic cohort.")
@click.option("--epochs", type=int, default=None, help="Override every row's epochs.")
@click.option("--lr", type=float, default=None, help="Override every row's learning rate.")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a config field of every row (repeatable), as for experiment.")
@_compute_options
def demo(out_dir: str, patients: int, epochs: int | None, lr: float | None, settings: tuple[str, ...],
         device: str | None, cache_dir: str | None) -> None:
    """Synthetic cohort + 10-fold CV of US only, MG only and MM concatenation."""
    from .datasets.synthetic import SynthConfig, generate_cohort
    from .experiment import run_experiment
    from .presets import demo_rows
    from .records import read_manifest

    out = Path(out_dir)
    data = out / "cohort"
    if not (data / "manifest.csv").is_file():
        click.echo(f"generating the synthetic cohort ({patients} patients) in {data}")
        generate_cohort(data, SynthConfig(n_patients=patients), progress=not _quiet())
    rows = demo_rows()
    for r in rows:
        if epochs is not None:
            r.train.epochs = epochs
        if lr is not None:
            r.train.lr = lr
        _apply(r, settings, device, cache_dir)
    run_experiment(read_manifest(data / "manifest.csv"), rows, out, title="breastfusion demo (synthetic cohort)",
                   command=_command_line(), progress=not _quiet())
    click.echo(f"report: {out / 'report.md'}  (metrics.json, roc.png, confusion.png beside it)")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_md", default=None, type=click.Path(dir_okay=False),
              help="Also write the markdown table to this file.")
@click.option("--json", "out_json", default=None, type=click.Path(dir_okay=False),
              help="Also write the table as JSON to this file.")
def cohort(manifest: str, out_md: str | None, out_json: str | None) -> None:
    """Cohort table of a manifest (the paper's Table 2): patients, breasts, images, MG views and kinds,
    US per breast and the subgroup columns, per class; counts of 1-4 shown as <5, no patient ids."""
    from .evaluation.cohort import cohort_markdown, cohort_table
    from .records import read_manifest

    table = cohort_table(read_manifest(manifest, check_files=False, require_labels=False))
    text = cohort_markdown(table)
    if out_md is not None:
        write_text(Path(out_md), text)
    if out_json is not None:
        write_text(Path(out_json), json.dumps(table, indent=1) + "\n")
    click.echo(text, nl=False)


@main.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--label", "labels", multiple=True,
              help="Name of each run in the table, in the order of RUNS (default: the folder names).")
@click.option("-o", "--out", "out_md", default=None, type=click.Path(dir_okay=False),
              help="Also write the markdown table to this file.")
def compare(runs: tuple[str, ...], labels: tuple[str, ...], out_md: str | None) -> None:
    """Experiment runs (e.g. two presets on the same manifest) side by side, row by row: each run's
    patient-level AUCs (mean ± std over folds) and its macro AUC's change from the first run's."""
    from .errors import ConfigError
    from .evaluation.report import side_by_side_markdown

    if labels and len(labels) != len(runs):
        raise ConfigError(f"{len(labels)} --label for {len(runs)} runs: give one per run, or none")
    names = list(labels) or [Path(r).name for r in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"two runs share the name {names}: give each a --label")
    tables = {}
    for name, run in zip(names, runs, strict=True):
        metrics = Path(run) / "metrics.json"
        if not metrics.is_file():
            raise ConfigError(f"{metrics}: not found (is {run} a finished experiment run folder?)")
        tables[name] = json.loads(metrics.read_text())["rows"]
    text = side_by_side_markdown(tables) + "\n"
    if out_md is not None:
        write_text(Path(out_md), text)
    click.echo(text, nl=False)


@main.group("cache", cls=_SubGroup)
def cache_group() -> None:
    """What the preprocessing and feature caches hold (`cache list`), and removing entries
    (`cache prune`). A removed entry is recomputed by the next run that needs it."""


def _cache_dir_option(f):
    from .config import TrainConfig

    return click.option("--cache-dir", default=TrainConfig().cache_dir, show_default=True,
                        type=click.Path(file_okay=False), help="The cache folder.")(f)


@cache_group.command("list")
@_cache_dir_option
def cache_list(cache_dir: str) -> None:
    """Every entry, largest first: size, files, when last used, its parameters."""
    from .caches import entries, table

    click.echo(table(entries(cache_dir)))


@cache_group.command("prune")
@_cache_dir_option
@click.argument("names", nargs=-1)
@click.option("--older-than", "older_than", type=float, default=None,
              help="Also remove every entry last used more than this many days ago.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
def cache_prune(cache_dir: str, names: tuple[str, ...], older_than: float | None, dry_run: bool) -> None:
    """Remove the entries NAMES (hashes as `cache list` prints them, or a unique start of one)
    and, with --older-than, the stale ones. Do not prune an entry a running command is filling."""
    from .caches import chosen, entries, human_bytes, prune, table
    from .errors import ConfigError

    if not names and older_than is None:
        raise ConfigError("name the entries to remove (see `breastfusion cache list`) or give --older-than DAYS")
    victims = chosen(entries(cache_dir), names, older_than)
    if not victims:
        click.echo("nothing to remove")
        return
    click.echo(table(victims))
    if dry_run:
        click.echo(f"dry run: would free {human_bytes(sum(e.bytes for e in victims))}")
        return
    click.echo(f"removed {len(victims)} entries, freed {human_bytes(prune(victims))}")


if __name__ == "__main__":  # pragma: no cover
    main()
