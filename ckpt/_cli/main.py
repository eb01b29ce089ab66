"""The ``ckpt`` command: a thin layer over :mod:`ckpt.tools`.

Each subcommand parses its arguments, calls one library function, and prints the
result as aligned text or, with ``--json``, as JSON on stdout. Errors print one line
``ckpt: error: <message>`` on stderr; progress bars go to stderr, on a terminal only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from ckpt import _config as config
from ckpt._cli._output import Progress, human_bytes, human_shape, human_time, print_json, table

EPILOG = """\
exit codes:
  0  success
  1  problems found (verify) or the operation failed
  2  bad usage (unknown command, bad arguments)

URLs: a local path, file://PATH, memory://NAME/PATH or s3://BUCKET/PREFIX.
S3 settings come from the AWS environment, or --storage-option KEY=VALUE
(e.g. --storage-option endpoint_url=http://127.0.0.1:9000).

examples:
  ckpt ls runs/a
  ckpt verify runs/a/step-000000100
  ckpt cp runs/a/step-000000100 s3://bucket/a/
  ckpt gc runs/a --keep-last 3
  ckpt export runs/a/step-000000100 out/ --only model
"""


def _storage_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: Any = json.loads(value)  # numbers, true/false, null, JSON objects
    except ValueError:
        parsed = value
    return key.strip(), parsed


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return v


def _size(text: str) -> int:
    from ckpt._config import parse_bytes

    try:
        v = parse_bytes(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GiB or 500MB, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return v


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    """Storage options given before and after the subcommand (the later win)."""
    return dict([*args.global_storage_option, *getattr(args, "storage_option", [])])


def _is_checkpoint(args: argparse.Namespace) -> bool:
    import ckpt
    from ckpt.errors import CheckpointError

    try:
        ckpt.read_manifest(args.run, storage_options=_opts(args))
    except (CheckpointError, OSError):
        return False
    return True


# -- subcommands ---------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    from ckpt import tools

    rows = tools.ls(args.run, include_incomplete=args.all, storage_options=_opts(args))
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        if _is_checkpoint(args):
            _error(f"{args.run} is one checkpoint, not a run; fix: `ckpt info {args.run}` shows it")
            return 1
        print(f"no {'' if args.all else 'committed '}checkpoints in {args.run}")
        return 0
    out = []
    for r in rows:
        lay = r["layout"] or {}
        tensors = lay.get("array", 0) + lay.get("packed", 0) + lay.get("pieces", 0)
        values = lay.get("json", 0) + lay.get("pickle", 0)
        status = "committed" if r["committed"] and not r["reason"] else (
            f"committed ({r['reason']})" if r["committed"] else f"incomplete: {r['reason']}")
        out.append(["-" if r["step"] is None else r["step"], r["name"], human_time(r["time"]), human_bytes(r["size"]),
                    r["world_size"] or "-", tensors if r["layout"] else "-", values if r["layout"] else "-", status])
    print(table(out, ["STEP", "NAME", "CREATED", "SIZE", "RANKS", "TENSORS", "VALUES", "STATUS"],
                right=(0, 3, 4, 5, 6)))
    return 0


def _n(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _layout_text(e: dict[str, Any]) -> str:
    lay = e["layout"]
    kind = lay["type"]
    if kind == "value":
        return "json value"
    if kind == "object":
        return f"pickled ({lay['path']})"
    boxes = f", {lay['boxes']} boxes from {lay['ranks']} ranks" if lay.get("boxes", 1) > 1 else ""
    if kind == "array":
        n = lay["shards"]
        return f"array, {n} shard{'s' if n != 1 else ''} of {human_shape(lay['shard_shape'])}{boxes}"
    if kind == "packed":
        return f"packed ({lay['path']})"
    return f"pieces, {lay['pieces']} arrays{boxes}"


def cmd_info(args: argparse.Namespace) -> int:
    from ckpt import tools

    d = tools.info(args.ckpt, storage_options=_opts(args))
    if args.json:
        print_json(d)
        return 0
    t = d["totals"]
    v = d["versions"]
    written = ", ".join(f"{k} {v[k]}" for k in ("ckpt", "torch", "tensorstore") if k in v)
    per_rank = d["bytes_per_rank"]
    lines = [
        ("checkpoint", d["url"]),
        ("step", "-" if d["step"] is None else d["step"]),
        ("created", human_time(d["created"])),
        ("world size", d["world_size"] if len(per_rank) <= 1 else
         f"{d['world_size']} (bytes per rank: {', '.join(human_bytes(b) for b in per_rank)})"),
        ("format", f"v{d['format_version']}" + (f", written by {written}" if written else "")),
        ("contents", f"{t['tensors']} tensors ({human_bytes(t['tensor_bytes'])}), {t['values']} values, "
                     f"{t['pickled']} pickled; {_n(t['arrays'], 'array')}, {_n(t['packs'], 'pack')}"),
    ]
    if d["user_metadata"]:
        lines.append(("metadata", json.dumps(d["user_metadata"], sort_keys=True)))
    width = max(len(k) for k, _ in lines)
    for k, val in lines:
        print(f"{k:<{width}}  {val}")
    print()
    rows = [[e["key"], e["kind"] if e["kind"] != "json" else "value", e["dtype"] or "-", human_shape(e["shape"]),
             human_bytes(e["nbytes"]), _layout_text(e)] for e in d["entries"]]
    print(table(rows, ["KEY", "KIND", "DTYPE", "SHAPE", "SIZE", "LAYOUT"], right=(4,)))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ckpt import tools

    with Progress("verify") as bar:
        report = tools.verify(args.ckpt, quick=args.quick, progress=bar, storage_options=_opts(args))
    if args.json:
        print_json(report.to_dict())
        return 0 if report.ok else 1
    mode = "quick: presence and sizes" if report.quick else "full"
    if report.ok:
        read = "" if report.quick else f", {report.shards_read} shards read ({human_bytes(report.bytes_read)})"
        print(f"OK {report.url} ({mode}): {report.entries} entries, {report.arrays} arrays, "
              f"{report.objects} objects{read} in {report.seconds:.2f} s")
        return 0
    for p in report.problems:
        print(str(p).replace("\n", " "))
    n = len(report.problems)
    print(f"FAILED {report.url} ({mode}): {n} problem{'s' if n != 1 else ''}")
    return 1


def cmd_cp(args: argparse.Namespace) -> int:
    from ckpt import tools

    with Progress("copy") as bar:
        r = tools.cp(args.src, args.dst, dry_run=args.dry_run, overwrite=args.overwrite, progress=bar,
                     storage_options=_opts(args))
    if args.json:
        print_json(r)
    elif args.dry_run:
        print(f"would copy {r['src']} -> {r['dst']}: {r['objects']} objects, {human_bytes(r['bytes'])}")
    else:
        print(f"copied {r['src']} -> {r['dst']}: {r['objects']} objects, {human_bytes(r['bytes'])} "
              f"in {r['seconds']:.2f} s (verified)")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from ckpt import tools

    r = tools.gc(args.run, keep_last=args.keep_last, dry_run=args.dry_run, grace=args.grace, force=args.force,
                 storage_options=_opts(args))
    if args.json:
        print_json({**r, "dry_run": args.dry_run})
        return 0
    verb = "would remove" if args.dry_run else "removed"
    rows = [[verb, x["name"], human_bytes(x["bytes"]), x["reason"]] for x in r["removed"]]
    rows += [["kept", x["name"], human_bytes(x["bytes"]), x["reason"]] for x in r["kept"]]
    if rows:
        print(table(rows, ["ACTION", "NAME", "SIZE", "REASON"], right=(2,)))
    total = sum(x["bytes"] for x in r["removed"])
    n = len(r["removed"])
    print(f"{verb} {n} director{'ies' if n != 1 else 'y'} ({human_bytes(total)}) in {args.run}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ckpt import tools

    with Progress("export") as bar:
        r = tools.export(args.ckpt, args.out, format=args.format, only=args.only, max_shard_bytes=args.max_shard_size,
                         progress=bar, storage_options=_opts(args))
    if args.json:
        print_json(r)
        return 0
    print(f"exported {r['tensors']} tensors ({human_bytes(r['bytes'])}) from {r['src']} as {r['format']}:")
    for f in r["files"] + ([r["index"]] if r["index"] else []):
        print(f"  {f}")
    if r["skipped"]:
        shown = ", ".join(r["skipped"][:5]) + (", ..." if len(r["skipped"]) > 5 else "")
        print(f"skipped {len(r['skipped'])} non-tensor entries: {shown}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from ckpt import tools

    r = tools.import_(args.src, args.dst, format=args.format, step=args.step, prefix=args.prefix,
                      allow_pickle=args.allow_pickle, overwrite=args.overwrite, storage_options=_opts(args))
    if args.json:
        print_json(r)
        return 0
    print(f"imported {r['tensors']} tensors ({human_bytes(r['bytes'])}) and {r['values']} values "
          f"from {r['src']} ({r['format']}) into {r['url']}")
    return 0


def cmd_reshard(args: argparse.Namespace) -> int:
    from ckpt import tools

    with Progress("reshard") as bar:
        r = tools.reshard(args.src, args.dst, args.world_size, layout=args.layout, overwrite=args.overwrite,
                          memory_bytes=args.memory << 20, progress=bar, storage_options=_opts(args))
    if args.json:
        print_json(r)
    else:
        per = ", ".join(human_bytes(b) for b in r["bytes_per_rank"])
        print(f"resharded {r['src']} -> {r['dst']} for {r['world_size']} ranks ({r['layout']}): "
              f"{r['tensors']} tensors, {human_bytes(r['bytes'])} in {r['seconds']:.2f} s; per rank: {per}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config.markdown(), end="")
        return 0
    rows = config.effective()
    if args.json:
        print_json([{"name": k.name, "value": v, "source": src, "default": k.default_text(), "doc": k.doc}
                    for k, v, src in rows])
        return 0
    width = max(len(k.name) for k, _, _ in rows)
    for k, v, src in rows:
        print(f"{k.name:<{width}}  {v!r:<24} ({src})")
    return 0


# -- the parser ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ckpt import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--storage-option", metavar="KEY=VALUE", action="append", type=_storage_option,
                        default=argparse.SUPPRESS,
                        help="an option for the storage backend (repeatable), e.g. endpoint_url=URL")
    js = argparse.ArgumentParser(add_help=False)
    js.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")

    p = argparse.ArgumentParser(prog="ckpt", description="Inspect, verify, copy, clean up and convert ckpt checkpoints.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ckpt {__version__}")
    p.add_argument("--storage-option", metavar="KEY=VALUE", action="append", type=_storage_option, default=[],
                   dest="global_storage_option", help="an option for the storage backend (repeatable), e.g. endpoint_url=URL")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help: str, func: Any, parents: list[argparse.ArgumentParser]) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, parents=parents, epilog=EPILOG,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.set_defaults(func=func)
        return sp

    sp = add("ls", "list the checkpoints of a run, newest first", cmd_ls, [common, js])
    sp.add_argument("run", metavar="RUN", help="the run (a directory of step-* checkpoints)")
    sp.add_argument("--all", action="store_true", help="also list incomplete checkpoints and why")

    sp = add("info", "show what a checkpoint holds", cmd_info, [common, js])
    sp.add_argument("ckpt", metavar="CKPT", help="the checkpoint (RUN/step-000000100)")

    sp = add("verify", "check every object and chunk of a checkpoint (exit 1 on problems)", cmd_verify, [common, js])
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("--quick", action="store_true", help="only check that every object exists with its size")

    sp = add("cp", "copy a committed checkpoint (between local disk, memory:// and s3://)", cmd_cp, [common, js])
    sp.add_argument("src", metavar="SRC", help="the checkpoint to copy")
    sp.add_argument("dst", metavar="DST", help="the new checkpoint's URL; ending in / : into that run, same name")
    sp.add_argument("--dry-run", action="store_true", help="say what would be copied, copy nothing")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")

    sp = add("gc", "remove debris of crashed saves; keep only the newest K checkpoints", cmd_gc, [common, js])
    sp.add_argument("run", metavar="RUN")
    sp.add_argument("--keep-last", metavar="K", type=_positive_int, default=None,
                    help="delete committed checkpoints older than the newest K (manifest first)")
    sp.add_argument("--dry-run", action="store_true", help="say what would be removed, remove nothing")
    sp.add_argument("--grace", metavar="SECONDS", type=_non_negative, default=3600.0,
                    help="leave debris written in the last SECONDS alone: a save may be writing it (default 3600)")
    sp.add_argument("--force", action="store_true",
                    help="remove debris regardless of age (needed on object stores, which cannot tell ages)")

    sp = add("export", "write a checkpoint's tensors as safetensors or torch.save files", cmd_export, [common, js])
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("out", metavar="OUT",
                    help="a directory, or one file (*.safetensors, or *.pt/*.pth/*.bin with --format torch)")
    sp.add_argument("--format", choices=["safetensors", "torch"], default="safetensors")
    sp.add_argument("--only", metavar="PREFIX", help="only keys under PREFIX, named without it (e.g. model)")
    sp.add_argument("--max-shard-size", metavar="SIZE", type=_size, default=5 << 30,
                    help="largest output file in a directory, e.g. 2GiB (default 5GiB)")

    sp = add("import", "convert a DCP checkpoint, torch.save file or safetensors into a ckpt checkpoint",
             cmd_import, [common, js])
    sp.add_argument("src", metavar="SRC", help="a DCP directory, a torch.save file, *.safetensors or a directory of them")
    sp.add_argument("dst", metavar="DST", help="the new checkpoint's URL (or the run, with --step)")
    sp.add_argument("--format", choices=["auto", "dcp", "torch", "safetensors"], default="auto")
    sp.add_argument("--step", type=int, default=None, help="write DST/step-<STEP> and record the step")
    sp.add_argument("--prefix", metavar="NAME", help="put every key under NAME (e.g. model)")
    sp.add_argument("--allow-pickle", action="store_true",
                    help="unpickle arbitrary objects (runs code: only for sources you trust)")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")

    sp = add("reshard", "rewrite a checkpoint for another world size (objects aligned to the new ranks)",
             cmd_reshard, [common, js])
    sp.add_argument("src", metavar="SRC", help="the checkpoint to rewrite")
    sp.add_argument("dst", metavar="DST", help="the new checkpoint's URL")
    sp.add_argument("--world-size", type=_positive_int, required=True, help="number of ranks of the target")
    sp.add_argument("--layout", choices=["shard0", "replicate"], default="shard0",
                    help="target layout: split dim 0 over the ranks (default) or whole tensors")
    sp.add_argument("--memory", metavar="MIB", type=_positive_int, default=256,
                    help="memory budget in MiB (one target shard at a time; default 256)")
    sp.add_argument("--overwrite", action="store_true", help="replace a committed checkpoint at DST")

    sp = add("config", "print every CKPT_* setting in effect and where it came from", cmd_config, [js])
    sp.add_argument("--markdown", action="store_true", help="print docs/configuration.md (the knob table)")
    return p


def _error(message: str) -> None:
    print(f"ckpt: error: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ckpt`` command; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (argparse printed it)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    from ckpt.errors import CheckpointError, CheckpointExistsError, UnknownURLSchemeError

    try:
        return int(args.func(args))
    except UnknownURLSchemeError as e:
        _error(str(e))
        return 2
    except CheckpointExistsError as e:  # its hint names the Python keyword; here it is a flag
        _error(str(CheckpointExistsError(e.message, key=e.key, path=e.path,
                                         hint="pass --overwrite to replace it, or choose another destination")))
        return 1
    except CheckpointError as e:
        _error(str(e))
        return 1
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except BrokenPipeError:  # `ckpt ls | head`
        sys.stderr.close()
        return 1
    except BaseException as e:  # noqa: BLE001 - one line, not a traceback (CKPT_DEBUG=1 shows it)
        if isinstance(e, SystemExit | GeneratorExit) or config.debug():
            raise
        _error(f"{type(e).__name__}: {e}" if not isinstance(e, OSError | ValueError) else str(e))
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
