"""The state of a resumable analysis (the staticness map, the replacement study): one state.json in its output
directory holding the fingerprint of the options it was started with and every record finished so far,
rewritten atomically after each, so that an interrupted run resumes where it stopped and never mixes options."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Collection

from hybrid_gpt.errors import HybridGPTError
from hybrid_gpt.fsutil import claimed_dir, read_json, write_json


class RunState:
    """state.json: {"options": fingerprint, <section>: {key: record}, "elapsed_s": seconds of finished work}."""

    def __init__(self, path: Path, fingerprint: dict, what: str, section: str = "records"):
        self.path, self.section = path, section
        self.data = {"options": fingerprint, section: {}, "elapsed_s": 0.0}
        if path.is_file():
            self.data = read_json(path, f"the {what}'s state")
            if not isinstance(self.data, dict) or not isinstance(self.data.get(section), dict):
                raise HybridGPTError(f"{path} is not the state of a {what}; pass --overwrite to start again")

    @property
    def records(self) -> dict:
        return self.data[self.section]

    def get(self, key: str):
        return self.records.get(key)

    def put(self, key: str, value, elapsed: float) -> None:
        self.records[key] = value
        self.data["elapsed_s"] = self.data.get("elapsed_s", 0.0) + elapsed
        write_json(self.path, self.data)


@contextmanager
def resumable_dir(out: Path, *, allowed: Collection[str], what: str, fingerprint: dict, overwrite: bool,
                  resume: bool, section: str = "records", free: Collection[str] = (), adopted: Collection[str] = (),
                  kind: type = RunState):
    """Claim ``out`` (fsutil.claimed_dir: refused when it holds anything at any depth that ``allowed`` does not
    name; replaced in place with ``overwrite``; continued with ``resume``) and yield its RunState, refusing a
    state made with other options, naming them; the options named in ``free`` may differ between runs (they
    choose what more to do, not how the finished records were made, or name where an input lies, whose identity
    is a digest among the options); those named in ``adopted`` (such digests) are compared where the stored state
    records them and adopted where it predates them. ``kind``: the RunState subclass to yield."""
    with claimed_dir(out, allowed=allowed, what=what, overwrite=overwrite, resume=resume, in_place=True,
                     exists_hint="pass --resume to continue it or --overwrite to replace it"):
        out.mkdir(parents=True, exist_ok=True)
        state = kind(out / "state.json", fingerprint, what, section)
        theirs = state.data.get("options")
        changed = []
        if theirs != fingerprint:
            theirs = theirs if isinstance(theirs, dict) else {}
            changed = sorted(k for k in {*fingerprint, *theirs} - set(free) if fingerprint.get(k) != theirs.get(k)
                             and not (k in adopted and k not in theirs))
        if changed:
            raise HybridGPTError(f"{out} holds a {what} made with other options ({', '.join(changed)}); pass the "
                                 "same options to resume it, --overwrite to replace it, or another --out")
        if theirs != fingerprint and state.path.is_file():  # record what was adopted, where a run now lies
            state.data["options"] = fingerprint
            write_json(state.path, state.data)
        state.data["options"] = fingerprint
        yield state
