"""Build the CSV index of a WorldMem-format data root: `train.csv` (from `training/`), `validation.csv` (from
`validation/`, when there is one) and `test.csv` (from `test/`).

    python -m decmem_jax.data.build_csv --root DIR [--seed 42] [--strict] [--splits training,validation,test]
                                        [--check probe|demux|decode] [--workers N]

By default every split folder is indexed; `validation/` is optional (WorldMem's data has none, `generate_world
--split all` writes one). With `--splits`, the listed folders are required and a split folder left out is named in
the summary as skipped, never ignored silently.

Each split folder is scanned recursively (hidden files, e.g. writers' temporary files, are ignored); `<stem>.mp4` and
`<stem>.npz` are paired by their path relative to the split folder without the suffix. Files without a partner are
reported. Every pair is validated (`format.check_clip_arrays` with the video's frame count; an npz that does
not load or an mp4 that is unreadable/truncated makes the pair invalid). How hard the mp4 is checked (`check`):

* ``probe``: container metadata only (fast; a truncated file with its index at the front passes);
* ``demux`` (default): also reads every video packet and requires the promised number of non-empty packets (catches
  truncation without decoding; reads the whole file);
* ``decode``: decodes every frame (slow; catches corrupt bitstreams).

The CSV (`format.CSV_COLUMNS` = `video_path,action_path`, then an extra `num_frames` column = the video's
frame count) holds paths relative to ROOT (where the CSV lives), one row per valid pair, sorted by path and then
shuffled with `np.random.default_rng(seed).permutation` (seed 42 = the DecMem reference convention). Readers look
columns up by name and ignore columns they do not know. The file is written to a temporary name and renamed into
place. Invalid pairs are left out and listed (file + every problem) in the printed summary; with `strict=True`
(`--strict`) any invalid pair, unpaired file or missing required split is an error: nothing is written, exit code 1.
A bad argument or a root that is missing or not writable is one line `error: ...` on stderr, exit code 2, found
before any file is checked.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import dataclasses
import difflib
import io
import os
import sys
import tempfile

import numpy as np

from decmem_jax import cli, video
from decmem_jax.format import CSV_COLUMNS, CSV_FOR_SPLIT, OPTIONAL_SPLITS, SPLITS, check_clip_arrays, read_clip_npz

EXTRA_COLUMNS = ("num_frames",)
CHECKS = ("probe", "demux", "decode")


@dataclasses.dataclass
class SplitSummary:
    split: str
    csv_name: str
    rows: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)  # (video, npz, num_frames), shuffled
    invalid: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)  # (mp4 path rel. ROOT, problems)
    unpaired: list[str] = dataclasses.field(default_factory=list)  # paths relative to ROOT
    missing: bool = False  # the split folder does not exist
    optional: bool = False  # a missing folder is no problem (validation/ when the splits were not named)
    written: str | None = None  # path of the CSV written (None: nothing written)


@dataclasses.dataclass
class Summary:
    root: str
    seed: int
    strict: bool
    splits: list[SplitSummary]
    skipped: list[str] = dataclasses.field(default_factory=list)  # split folders present but not asked for
    folders: list[str] = dataclasses.field(default_factory=list)  # the root's folders (for "did you mean")

    @property
    def ok(self) -> bool:
        """No invalid pair, unpaired file or missing required split folder."""
        return not any(s.invalid or s.unpaired or (s.missing and not s.optional) for s in self.splits)

    @property
    def invalid(self) -> dict[str, list[str]]:
        return {path: problems for s in self.splits for path, problems in s.invalid}

    @property
    def unpaired(self) -> list[str]:
        return [p for s in self.splits for p in s.unpaired]

    def format(self) -> str:
        out = [f"CSV index of {self.root} (seed {self.seed}{', strict' if self.strict else ''})"]
        for s in self.splits:
            if s.missing:
                if not s.optional:
                    near = difflib.get_close_matches(s.split, self.folders, n=1)
                    out.append(f"  {s.split}/: folder missing, no {s.csv_name}"
                               + (f" (did you mean {near[0]}?)" if near else ""))
                continue
            where = f"-> {s.written}" if s.written else "(not written)"
            out.append(f"  {s.split}/: {len(s.rows)} valid pairs {where}; {len(s.invalid)} invalid, "
                       f"{len(s.unpaired)} unpaired files")
            for path, problems in s.invalid:
                out.append(f"    INVALID {path}: " + "; ".join(problems))
            for path in s.unpaired:
                out.append(f"    UNPAIRED {path}: no {'npz' if path.endswith('.mp4') else 'mp4'} with the same stem")
        for split in self.skipped:
            out.append(f"  {split}/: skipped (not in --splits), no {CSV_FOR_SPLIT.get(split, split + '.csv')} "
                       "written; add it to --splits to index it")
        if self.strict and not self.ok:
            out.append("strict mode: problems found, nothing written")
        return "\n".join(out)


def scan_split(split_dir: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs [(mp4, npz)], unpaired files) under `split_dir`, as paths relative to it (posix), sorted."""
    found: dict[str, dict[str, str]] = {}
    for dirpath, dirnames, filenames in os.walk(split_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if name.startswith(".") or ext.lower() not in (".mp4", ".npz"):
                continue
            rel = os.path.relpath(os.path.join(dirpath, name), split_dir).replace(os.sep, "/")
            found.setdefault(rel[: -len(ext)], {})[ext.lower()] = rel
    pairs, unpaired = [], []
    for stem in sorted(found):
        files = found[stem]
        if len(files) == 2:
            pairs.append((files[".mp4"], files[".npz"]))
        else:
            unpaired.extend(files.values())
    return pairs, unpaired


def _video_frames(path: str, check: str) -> int:
    """The video's frame count after the `check` (see the module docstring); raises VideoError."""
    info = video.probe(path)
    if check == "probe":
        return info.num_frames
    if check == "decode":
        n = sum(1 for _ in video.iter_frames(path))  # raises VideoError on a short or corrupt stream
        return n
    import av  # demux: count non-empty packets without decoding
    try:
        with av.open(path, "r") as container:
            n = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    except (av.FFmpegError, OSError) as e:
        raise video.VideoError(f"{path}: cannot read video packets (truncated or corrupt file): {e}") from e
    if n < info.num_frames:
        raise video.VideoError(f"{path}: only {n} of the {info.num_frames} promised frames are present "
                               f"(truncated file)")
    return n


def validate_pair(mp4: str, npz: str, check: str = "demux") -> tuple[int | None, list[str]]:
    """(video frame count or None, every problem) for one pair of absolute paths."""
    problems, num_frames = [], None
    try:
        num_frames = _video_frames(mp4, check)
    except video.VideoError as e:
        problems.append(f"video: {str(e).removeprefix(mp4 + ': ')}")
    try:
        actions, poses = read_clip_npz(npz)
    except ValueError as e:  # names the npz (the pair is listed under its mp4)
        problems.append(f"npz does not load: {os.path.basename(npz)}{str(e).removeprefix(npz)}")
    else:
        problems += [f"npz: {p}" for p in check_clip_arrays(actions, poses, num_frames)]
    return num_frames, problems


def _write_csv_atomic(path: str, rows: list[tuple[str, str, int]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*CSV_COLUMNS, *EXTRA_COLUMNS])
    writer.writerows(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_csv(root, seed: int = 42, strict: bool = False, splits=None, *, check: str = "demux",
              workers: int | None = None, progress: bool = True) -> Summary:
    """Scan, validate and index the splits of `root` (None: every split folder, validation/ optional; a list: those
    folders, each required); write the CSVs (unless strict and problems) and return the Summary. See the module
    docstring. Bad arguments and an unusable root raise ValueError / FileNotFoundError before any file is read."""
    from tqdm.auto import tqdm

    if check not in CHECKS:
        raise ValueError(f"check={check!r}; expected one of {CHECKS}")
    if seed < 0:
        raise ValueError(f"seed={seed}: must be >= 0")
    if workers is not None and workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    named = splits is not None
    splits = list(SPLITS if splits is None else splits)
    if not splits or any(not s or "/" in s or s.startswith(".") for s in splits):
        raise ValueError(f"splits={splits}: expected split folder names such as {', '.join(SPLITS)}")
    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        what = "is a file, not" if os.path.exists(root) else "no such folder;"
        raise FileNotFoundError(f"{root}: {what} a data root holding training/ and test/ (python -m "
                                "decmem_jax.data.generate_world writes one)")
    problem = cli.output_problem(root)
    if problem:  # the CSVs are written into the root: know now, not after checking every pair
        raise ValueError(f"{root}: cannot write the CSV index here: {problem}")
    workers = workers or min(8, os.cpu_count() or 1)
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    summary = Summary(root, seed, strict, [], skipped=[s for s in SPLITS if s not in splits and s in folders],
                      folders=folders)
    for split in splits:
        optional = not named and split in OPTIONAL_SPLITS
        s = SplitSummary(split, CSV_FOR_SPLIT.get(split, f"{split}.csv"), optional=optional)
        summary.splits.append(s)
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            s.missing = True
            continue
        pairs, unpaired = scan_split(split_dir)
        s.unpaired = [f"{split}/{p}" for p in unpaired]
        jobs = [(os.path.join(split_dir, m), os.path.join(split_dir, n)) for m, n in pairs]
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            results = list(tqdm(pool.map(lambda j: validate_pair(*j, check=check), jobs), total=len(jobs),
                                desc=f"checking {split}/", unit="pair", disable=not progress))
        rows = []
        for (mp4, npz), (num_frames, problems) in zip(pairs, results):
            if problems:
                s.invalid.append((f"{split}/{mp4}", problems))
            else:
                rows.append((f"{split}/{mp4}", f"{split}/{npz}", num_frames))
        rows.sort()
        s.rows = [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    if strict and not summary.ok:
        return summary
    for s in summary.splits:
        if not s.missing:
            s.written = os.path.join(root, s.csv_name)
            _write_csv_atomic(s.written, s.rows)
    return summary


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="python -m decmem_jax.data.build_csv", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root holding the split folders; the CSVs are written here")
    p.add_argument("--seed", type=cli.non_negative_int, default=42, help="shuffle seed (default 42)")
    p.add_argument("--strict", action="store_true", help="any invalid pair / unpaired file: write nothing, exit 1")
    p.add_argument("--splits", default=None, help="comma-separated split folders, each required (default: every "
                   f"split folder of {','.join(SPLITS)}; {','.join(OPTIONAL_SPLITS)} only when present)")
    p.add_argument("--check", choices=CHECKS, default="demux", help="how hard to check each mp4 (default demux)")
    p.add_argument("--workers", type=cli.positive_int, default=None,
                   help="parallel validation threads (default min(8, cpus))")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    splits = None if args.splits is None else [s.strip() for s in args.splits.split(",") if s.strip()]
    if splits is not None and not splits:
        p.error(f"argument --splits: {args.splits!r} names no split folder (e.g. training,test)")
    try:
        summary = build_csv(args.root, args.seed, args.strict, splits, check=args.check, workers=args.workers,
                            progress=not args.no_progress)
    except (OSError, ValueError) as e:  # a bad root or argument (OSError: also a failed write of a CSV)
        return cli.fail(e)
    print(summary.format())
    if not any(sp.written for sp in summary.splits):  # e.g. every named split folder missing: nothing indexed
        return 1
    return 1 if args.strict and not summary.ok else 0


if __name__ == "__main__":
    sys.exit(main())
