"""Where a scoring job's files go and what identifies it: shared by the local job (`ixc_engine/cli.py`) and the Ray
driver (`ixc_engine/integrations/ray.py`). Standard library only at import time, so that the CLI can name its
output (and lock it) before torch is imported."""

from __future__ import annotations

from pathlib import Path


def shard_output(path: Path, shard: tuple[int, int]) -> Path:
    """The scores file of shard (i, n) of a job writing `path`: NAME.shardI-of-N.jsonl (`path` itself when n is 1)."""
    i, n = shard
    if n == 1:
        return path
    stem = path.name.removesuffix(".jsonl")
    return path.with_name(f"{stem}.shard{i}-of-{n}.jsonl")


def model_key(model: str) -> str:
    """How a job remembers its model: the absolute path of a local directory, else the hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def check_outputs_apart(inputs: dict[str, Path], outputs: list[Path]) -> None:
    """Refuse an output that is one of the inputs ({what: path}), e.g. -o naming the corpus."""
    from ixc_engine.corpus import same_file

    for out in outputs:
        for what, path in inputs.items():
            if same_file(out, path):
                raise ValueError(f"output {out} is the {what} {path}: choose another -o")


def records_to_do(records, done: dict, corpus: Path, out_path: Path):
    """The (line, Sample | LineError) pairs of `records` not yet in the results (`done`: line -> recorded id).

    Results are written in input order, so every resumed line is checked before anything new is written: a line whose
    id differs from the recorded one means the corpus changed since the first run, and the job stops (ValueError)."""
    from ixc_engine.corpus import LineError

    for ln, item in records:
        if ln not in done:
            yield ln, item
            continue
        cid = item.sample_id if isinstance(item, LineError) else item.id
        if done[ln] is not None and cid is not None and done[ln] != cid:
            raise ValueError(f"line {ln} of {corpus} has id {cid!r} but {out_path} recorded {done[ln]!r} for it: the "
                             "corpus changed since the first run; use --restart to score it anew")


def job_for(args, total_lines: int, out_path: Path, job_path: Path):
    """This run's job (a `JobManifest` of `score`'s arguments over a corpus of `total_lines` records), the job recorded
    at `job_path` (None with --restart or when there is none) and how many records are this shard's. A recorded job
    with other settings is refused (ValueError), so that one scores file never mixes two jobs' results."""
    from ixc_engine.corpus import JobManifest

    i, n = args.shard
    mine = len(range(i, total_lines, n))
    job = JobManifest(corpus=str(args.corpus.resolve()), model=model_key(args.model), hd_num=args.hd_num,
                      max_length=args.max_length, shard=args.shard, lines=mine, strict=args.strict,
                      escape_special_tokens=args.escape_special_tokens)
    previous = None if args.restart else JobManifest.load(job_path)
    if previous is not None and (diff := previous.differences(job)):
        raise ValueError(f"{out_path} holds the results of another job ({'; '.join(diff)}): use --restart to "
                         "score from scratch into it, or choose another -o")
    return job, previous, mine
