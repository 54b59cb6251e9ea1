"""Runs in the background: one `python -m deltatune train <recipe.yaml>` process per run, its state on disk.

Everything about a run lives in its folder under the workspace (the run's `output_dir`): `recipe.yaml` (what it was
started from), `studio.json` (process id, starts, stop requests), `train.log` (the process's output), and what the
trainer writes (log.jsonl, data_report.json, train_summary.json, metrics.json, run_config.yaml, the adapter). So a
reload of the page or a restart of the studio finds every run as it is: a process still alive is recognised by
its command line in /proc, a finished one by its files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import yaml

from deltatune.apps.studio.workspace import RECIPE_FILE, STATE_FILE, Workspace
from deltatune.errors import DeltatuneError, RunError
from deltatune.train.recipe import DATA_REPORT, RUN_CONFIG
from deltatune.train.trainer import CHECKPOINT, LOG, SUMMARY, TrainConfig, planned_steps

CONSOLE = "train.log"
METRICS = "metrics.json"
ADAPTER_FILE = "adapter_model.safetensors"


def read_json(path: str) -> Any:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None


def read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_log(folder: str) -> list[dict[str, Any]]:
    """log.jsonl's records; a last line cut short by a kill (or still being written) is left out."""
    records = []
    with contextlib.suppress(OSError), open(os.path.join(folder, LOG)) as fh:
        for line in fh:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def tail(path: str, lines: int = 30) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()][-lines:]


class Runs:
    """Start, stop, resume and describe the runs of a workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.children: dict[str, subprocess.Popen] = {}  # runs this studio process started
        self.lock = threading.Lock()

    # --- state on disk ---------------------------------------------------------------------------------
    def _state(self, folder: str) -> dict[str, Any]:
        return read_json(os.path.join(folder, STATE_FILE)) or {}

    def _write_state(self, folder: str, state: dict[str, Any]) -> None:
        path = os.path.join(folder, STATE_FILE)
        with open(path + ".tmp", "w") as fh:
            json.dump(state, fh, indent=2)
        os.replace(path + ".tmp", path)

    def _alive(self, name: str, folder: str, state: dict[str, Any]) -> bool:
        """Whether the run's process is running: our child (polled, so it is reaped), or after a restart of the
        studio a process whose command line names this run's recipe (a reused pid does not)."""
        child = self.children.get(name)
        if child is not None:
            code = child.poll()
            if code is None:
                return True
            del self.children[name]
            state["exit_code"] = code
            state["ended_at"] = time.time()
            self._write_state(folder, state)
            return False
        pid = state.get("pid")
        if not pid or state.get("exit_code") is not None:
            return False
        try:
            with open(f"/proc/{int(pid)}/cmdline", "rb") as fh:
                return os.path.join(folder, RECIPE_FILE).encode() in fh.read()
        except OSError:
            return False

    def phase(self, name: str, folder: str, state: dict[str, Any]) -> str:
        """running | finished | stopped | failed; a run folder the studio did not start (`deltatune train
        --output_dir ...`) is finished once the trainer wrote its metrics, else incomplete."""
        if not state:
            return "finished" if os.path.isfile(os.path.join(folder, METRICS)) else "incomplete"
        if self._alive(name, folder, state):
            return "running"
        code = state.get("exit_code")
        metrics = os.path.join(folder, METRICS)
        wrote_metrics = os.path.isfile(metrics) and os.path.getmtime(metrics) >= state.get("started_at", 0)
        if code == 0 or (code is None and wrote_metrics):
            return "finished"
        return "stopped" if state.get("stop_requested") else "failed"

    # --- actions -------------------------------------------------------------------------------------
    def start(self, name: str, recipe: dict[str, Any]) -> dict[str, Any]:
        """Write the run's recipe (output_dir: its folder in the workspace) and start training it."""
        folder = self.ws.run_folder(name, must_exist=False)
        with self.lock:
            if os.path.exists(folder):
                raise RunError(
                    f"The workspace already has a run named {name!r}; open it from the run list, or pick a new name."
                )
            os.makedirs(folder)
            recipe = {**recipe, "output_dir": folder, "progress": False}
            with open(os.path.join(folder, RECIPE_FILE), "w") as fh:
                fh.write(f"# written by deltatune studio; rerun with: deltatune train {RECIPE_FILE}\n")
                yaml.safe_dump(recipe, fh, sort_keys=False, allow_unicode=True)
            self._write_state(folder, {"name": name, "created_at": time.time(), "starts": []})
            self._launch(name, folder, [])
        return self.describe(name)

    def _launch(self, name: str, folder: str, flags: list[str]) -> None:
        command = [sys.executable, "-m", "deltatune", "train", os.path.join(folder, RECIPE_FILE), *flags]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        with open(os.path.join(folder, CONSOLE), "ab") as console:
            console.write(f"\n$ deltatune train {RECIPE_FILE} {' '.join(flags)}\n".encode())
            console.flush()
            child = subprocess.Popen(
                command,
                cwd=self.ws.root,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group: Stop ends it and nothing else
            )
        self.children[name] = child
        state = self._state(folder)
        state.update(
            pid=child.pid, started_at=time.time(), stop_requested=False, exit_code=None, ended_at=None
        )
        state.setdefault("starts", []).append({"at": state["started_at"], "flags": flags})
        self._write_state(folder, state)

    def stop(self, name: str, wait_s: float = 10.0) -> dict[str, Any]:
        """End the run's process group (SIGTERM, then SIGKILL after `wait_s`); Resume continues from its last
        checkpoint (every `save_every` steps)."""
        folder = self.ws.run_folder(name)
        with self.lock:
            state = self._state(folder)
            if not self._alive(name, folder, state):
                raise RunError(f"Run {name!r} is not running.")
            state["stop_requested"] = True
            self._write_state(folder, state)
            pid = int(state["pid"])
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.time() + wait_s
            while self._alive(name, folder, state) and time.time() < deadline:
                time.sleep(0.05)
            if self._alive(name, folder, state):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        return self.describe(name)

    def resume(self, name: str) -> dict[str, Any]:
        """Start a stopped or failed run again: from its checkpoint (`--resume`) when it has one, else over from
        step 0 (`--overwrite`, which clears only the trainer's files)."""
        folder = self.ws.run_folder(name)
        with self.lock:
            state = self._state(folder)
            if not os.path.isfile(os.path.join(folder, RECIPE_FILE)):
                raise RunError(
                    f"Run {name!r} was not started by the studio; resume it with `deltatune train`."
                )
            if self._alive(name, folder, state):
                raise RunError(f"Run {name!r} is already running.")
            if self.phase(name, folder, state) == "finished":
                raise RunError(f"Run {name!r} has finished; start a new run to train again.")
            has_checkpoint = os.path.isfile(os.path.join(folder, CHECKPOINT))
            self._launch(name, folder, ["--resume"] if has_checkpoint else ["--overwrite"])
        return self.describe(name)

    # --- what the pages show ---------------------------------------------------------------------------
    def recipe(self, folder: str) -> dict[str, Any]:
        return read_yaml(os.path.join(folder, RECIPE_FILE)) or read_yaml(os.path.join(folder, RUN_CONFIG))

    def progress(self, folder: str, recipe: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
        """Step, planned steps, elapsed training time and the time left at the pace so far."""
        steps = [r for r in records if "loss" in r]
        step = steps[-1]["step"] if steps else 0
        elapsed = steps[-1].get("elapsed_s") if steps else None
        summary = read_json(os.path.join(folder, SUMMARY))
        total = None
        if summary:
            total = summary.get("steps")
        else:
            report = read_json(os.path.join(folder, DATA_REPORT)) or {}
            rows = (report.get("rows") or {}).get("train")
            fields = {k: v for k, v in recipe.items() if k in TrainConfig.__dataclass_fields__}
            with contextlib.suppress(TypeError, ValueError, DeltatuneError):  # a hand-edited recipe
                config = TrainConfig(**{k: v for k, v in fields.items() if k not in ("resume", "overwrite")})
                if config.max_steps > 0 or rows:
                    total = planned_steps(config, rows or 1)
        eta = None
        if elapsed and step and total and step < total:
            eta = elapsed / step * (total - step)
        return {"step": step, "total_steps": total, "elapsed_s": elapsed, "eta_s": eta}

    def files(self, folder: str) -> list[dict[str, Any]]:
        out = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not name.endswith(".tmp"):
                out.append({"name": name, "bytes": os.path.getsize(path)})
        return out

    def describe(self, name: str, with_log: bool = False) -> dict[str, Any]:
        """Everything the run page shows, read from the run's folder."""
        folder = self.ws.run_folder(name)
        state = self._state(folder)
        phase = self.phase(name, folder, state)
        recipe = self.recipe(folder)
        records = read_log(folder)
        summary = read_json(os.path.join(folder, SUMMARY)) or {}
        metrics = read_json(os.path.join(folder, METRICS)) or {}
        adapter = os.path.join(folder, ADAPTER_FILE)
        out = {
            "name": name,
            "folder": folder,
            "state": phase,
            "model": recipe.get("model"),
            "task": recipe.get("task", "seq-cls"),
            "method": recipe.get("method", "lora"),
            "created_at": state.get("created_at") or os.path.getmtime(folder),
            "started_at": state.get("started_at"),
            "starts": len(state.get("starts", [])),
            "has_checkpoint": os.path.isfile(os.path.join(folder, CHECKPOINT)),
            "progress": self.progress(folder, recipe, records),
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
            "trainable_params": summary.get("trainable_params"),
            "total_params": summary.get("total_params"),
            "wall_time_s": summary.get("wall_time_s"),
            "peak_memory_mb": summary.get("peak_memory_mb"),
            "stored_bytes": os.path.getsize(adapter) if os.path.isfile(adapter) else None,
            "has_adapter": os.path.isfile(adapter) and os.path.isfile(os.path.join(folder, RUN_CONFIG)),
        }
        if phase == "failed":
            lines = [line for line in tail(os.path.join(folder, CONSOLE), 200) if line.strip()]
            errors = [line for line in lines if line.startswith("error:")]
            out["error"] = (errors or lines or ["the process ended without output"])[-1]
        if with_log:
            out["recipe"] = recipe
            out["data_report"] = read_json(os.path.join(folder, DATA_REPORT))
            out["console"] = tail(os.path.join(folder, CONSOLE))
            out["files"] = self.files(folder)
            out["summary"] = summary
        return out

    def list(self) -> list[dict[str, Any]]:
        return [self.describe(name) for name in self.ws.run_names()]

    def log(self, name: str, since: int = 0) -> dict[str, Any]:
        """log.jsonl's records from index `since` on (the page asks only for new ones); `count` tells the page
        when the log was rewritten shorter (a resume drops what was logged after the last checkpoint)."""
        records = read_log(self.ws.run_folder(name))
        return {"count": len(records), "records": records[since:] if since <= len(records) else records}

    def file(self, name: str, filename: str) -> str:
        """A file of the run's folder (no sub-folders, no links out of it)."""
        folder = self.ws.run_folder(name)
        path = self.ws.resolve(os.path.join(folder, os.path.basename(filename)), what="file")
        if os.path.dirname(path) != os.path.realpath(folder) or not os.path.isfile(path):
            raise FileNotFoundError(f"Run {name!r} has no file {filename!r}.")
        return path
