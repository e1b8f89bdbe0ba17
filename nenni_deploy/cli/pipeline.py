"""`nenni pipeline CONFIG`: every stage from one config file, then one report folder."""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import NenniError
from .options import _compose


def invoke_command(args: list[str]) -> None:
    """Run one `nenni` command in this process, echoing it first, as a user would type it."""
    from . import main

    click.secho("$ nenni " + " ".join(args), fg="cyan")
    try:
        main.main(args=args, prog_name="nenni", standalone_mode=False)
    except click.ClickException as exc:
        # One line naming the stage's command; the pipeline stops there and keeps what the earlier stages wrote.
        raise NenniError(f"nenni {args[0]} failed: {exc.format_message()}") from None


def preflight(args: list[str]) -> None:
    """Parse one stage's command line without running it, so a typo or an out-of-range option in the config fails
    before the first stage spends an hour training."""
    from . import main

    # The root's context settings (-h) must reach the subcommand: click caches its help option on first parse.
    with click.Context(main, info_name="nenni", **main.context_settings) as ctx:
        command = main.get_command(ctx, args[0])
        try:
            command.make_context(args[0], list(args[1:]), parent=ctx).close()
        except click.ClickException as exc:
            raise NenniError(f"config: nenni {args[0]}: {exc.format_message()}") from None


def run(config, force: bool, dry_run: bool, out: Path | None, threads: int | None) -> dict:
    from dataclasses import replace

    from ..pipeline import load_config, run_pipeline, summarise, write_report
    from ..pipeline.config import check_paths
    from ..pipeline.stages import plan_stages

    cfg = load_config(config)
    if out is not None:
        cfg = replace(cfg, out=out)
    if threads is not None:
        cfg = replace(cfg, threads=threads)
    check_paths(cfg)
    planned = plan_stages(cfg, force)
    for item in planned:
        for args in item.commands:
            preflight(args)
    if dry_run:
        for item in planned:
            what = "done earlier with the same arguments: a run now skips it" if item.skip else "would run"
            click.echo(f"[{item.stage.name}] {what}")
            for args in item.commands:
                click.echo("  nenni " + " ".join(args))
        return {}
    start = time.perf_counter()
    stages = run_pipeline(cfg, invoke_command, force=force, echo=click.echo)
    if all(s["status"] == "skipped" for s in stages.values()):
        click.echo(f"up to date: every stage ran earlier with the same arguments ({cfg.out}; --force reruns them)")
    summary = summarise(cfg, stages, time.perf_counter() - start)
    _, report = write_report(cfg, summary)
    click.echo("")
    click.secho(f"report: {report}", bold=True)
    for line in summary["headline"]:
        click.echo("  " + line)
    return summary


def pipeline_options():
    return _compose(
        click.option(
            "--out",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Output folder (default: the config's `out`).",
        ),
        click.option("--threads", type=click.IntRange(1, 256), default=None, help="Override the config's threads."),
        click.option("--force", is_flag=True, help="Rerun every stage, even those done with the same arguments."),
        click.option("--dry-run", is_flag=True, help="Print the commands the stages would run, run nothing."),
    )


@click.command(name="pipeline")
@click.argument("config")
@pipeline_options()
def command(config, out, threads, force, dry_run):
    """Run the stages CONFIG (a TOML file, or a built-in name: demo, cifar10-resnet20, cifar10-resnet4b) sets up:
    train or import, calibrate, fine-tune, prune (static pruning beside NENNI, with a [prune] table), export,
    check, bench, eval; then write OUT/report.md and summary.json.

    A stage already done with the same arguments is skipped, so a stopped pipeline resumes where it stopped."""
    run(config, force, dry_run, out, threads)
