"""The running service's parts, bundled: settings, model catalogue, job queue and device workers."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from engine.manifest import API_VERSION, MANIFEST
from engine.request import limits_json
from engine.server import families
from engine.server.catalog import (
    ModelCatalog,
    ModelEntry,
    local_model_name,
    looks_like_local_path,
)
from engine.server.instance import current_install_id
from engine.server.jobs import FETCHED_GRACE_S, Job, JobQueue, JobState
from engine.server.schema import (
    DeviceMemory,
    Health,
    Instance,
    JobProgress,
    JobStatus,
    Limits,
    ModelInfo,
    ModelLoadState,
    ModelsResponse,
    QueueStats,
    ResultInfo,
    WorkerState,
)
from engine.server.settings import ServerSettings
from engine.server.workers import WorkerPool

log = logging.getLogger(__name__)
# Catalogue fields GET /v1/models passes on as they are.
CATALOGUE_FIELDS = ("download_gb", "vram_gb", "recommended", "presets", "non_commercial")


def describe_device(name: str) -> str:
    """`auto` shown as what it resolves to here (cuda, mps or cpu)."""
    try:
        from engine.devices import resolve_device

        return str(resolve_device(name))
    except Exception:
        return name


@dataclass
class Service:
    settings: ServerSettings
    catalog: ModelCatalog
    queue: JobQueue
    pool: WorkerPool

    def health(self, local_client: bool = True, authenticated: bool = False) -> Health:
        """`local_client`: the caller is on this machine (loopback), so it may see the token
        file's path and the process id. Health needs no token, so it names models by their
        public ids (never a folder's path) and shows a load's error text only to a caller that
        sent the token (`authenticated`): that text can quote paths and library internals."""
        now = time.monotonic()
        records = self.pool.load_records()
        default_target = self.catalog.resolve_model(None).target
        default_loads = [r for r in records if r.model == default_target]
        if any(r.state == "ready" for r in default_loads):
            status = "ok"
        elif default_loads and all(
            r.state == "failed" for r in default_loads[-len(self.pool.workers) :]
        ):
            status = "error"
        elif not self.settings.preload and not default_loads:
            status = "ok"  # loads with the first edit
        else:
            status = "loading"
        if self.pool.check() is not None:
            # A worker is dead: the service is about to exit (or must be restarted).
            status = "error"
        devices = [describe_device(d) for d in self.settings.devices]
        return Health(
            status=status,
            name=str(MANIFEST["name"]),
            version=str(MANIFEST["version"]),
            api_version=API_VERSION,
            devices=devices,
            device=devices[0],
            model=self.public_model_name(self.settings.model),
            loaded_models=[self.public_model_name(m) for m in self.pool.loaded_models()],
            model_loads=[
                ModelLoadState(
                    model=self.public_model_name(r.model),
                    device=describe_device(r.device),
                    state=r.state,  # type: ignore[arg-type]
                    elapsed_s=round(r.elapsed_s(now), 3),
                    error=(
                        r.error
                        if authenticated or r.error is None
                        else f"failed to load model {self.public_model_name(r.model)}; see the "
                        "engine log (or GET /v1/health with the token) for why"
                    ),
                )
                for r in records
            ],
            queue=QueueStats(**self.queue.stats()),
            memory=self.memory(),
            workers=[
                WorkerState(**self._public_worker_state(state, authenticated))
                for state in self.pool.worker_states()
            ],
            instance=Instance(
                install_id=current_install_id(),
                token_file=(
                    str(self.settings.token_file)
                    if local_client and self.settings.token_file is not None
                    else None
                ),
                pid=os.getpid() if local_client else None,
            ),
        )

    @staticmethod
    def _public_worker_state(state: dict[str, Any], authenticated: bool) -> dict[str, Any]:
        """A dead worker's error text only for a caller with the token (it can quote paths)."""
        if state.get("error") is None or authenticated:
            return state
        return {
            **state,
            "error": "the worker stopped after a fatal error; see the engine log "
            "(or GET /v1/health with the token) for why",
        }

    def public_model_name(self, target: str) -> str:
        """What health calls a model: its id when it is a catalogue or hub id, else (a folder
        or file on this machine) its listed name: the folder's or file's own name, never the
        path that leads to it."""
        entry = self.catalog.entry_for_target(target)
        if entry is not None and not looks_like_local_path(entry.id):
            return entry.id
        return local_model_name(target)

    def memory(self) -> list[DeviceMemory]:
        """Per worker: free/total memory and the memory plan (the loaded editor's own report,
        else the --memory-plan flag's plan, else the one free memory allows the default model)."""
        reports = []
        for worker in self.pool.workers:
            name = describe_device(worker.device)
            try:
                report = self._device_memory(name, worker.memory_report())
                reports.append(DeviceMemory(**report))
            except Exception as err:  # a report must never break health
                log.debug("memory report for %s failed: %s", name, err)
                reports.append(
                    DeviceMemory(
                        device=name,
                        plan=None,
                        free_bytes=None,
                        total_bytes=None,
                        quantization=self.settings.quantization,
                    )
                )
        return reports

    def _device_memory(self, name: str, editor_report: dict[str, Any] | None) -> dict[str, Any]:
        import torch

        from engine import devices

        device = torch.device(name)
        if editor_report is not None and editor_report.get("plan"):
            report = {**editor_report, "device": name}
            report["quantization"] = report.get("quantization") or "none"
            return report
        quantization = self.settings.quantization
        report = devices.memory_report(device, None, quantization)
        plan = None if self.settings.memory_plan == "auto" else self.settings.memory_plan
        if plan is None:
            plan = devices.choose_memory_plan(
                self._vram_table(quantization), report.get("free_bytes"), device
            )
        report["plan"] = plan
        return report

    def _vram_table(self, quantization: str) -> dict[str, float] | None:
        """The default model's GB per plan (its quantized table when one is in force)."""
        # The catalogue list only: health must stay cheap (no folder scan).
        entry = next((e for e in self.catalog.catalogue if e["id"] == self.settings.model), {})
        table = dict(entry.get("vram_gb") or {})
        quantized = (entry.get("quantizations") or {}).get(quantization)
        if isinstance(quantized, dict):
            table.update(quantized)
        return table or None

    def models(self) -> ModelsResponse:
        loaded = set(self.pool.loaded_models())
        default_id = self.catalog.resolve_model(None).id
        return ModelsResponse(
            default_model=default_id,
            models=[
                self._model_info(entry, entry.id == default_id, entry.target in loaded)
                for entry in self.catalog.entries()
            ],
            loras=sorted(self.catalog.loras()),
            limits=Limits(**limits_json()),
        )

    def _model_info(self, entry: ModelEntry, default: bool, loaded: bool) -> ModelInfo:
        published = {
            key: entry.catalogue[key] for key in CATALOGUE_FIELDS if key in entry.catalogue
        }
        return ModelInfo(
            id=entry.id,
            name=entry.name,
            source=entry.source,  # type: ignore[arg-type]
            architecture=entry.architecture,
            licence=entry.licence,
            description=entry.description,
            default=default,
            available_locally=self.catalog.is_available_locally(entry),
            loaded=loaded,
            **families.describe(entry.family),
            **published,
        )

    def status(self, job: Job) -> JobStatus:
        position = self.queue.queue_position(job)
        now = time.monotonic()
        with self.queue.lock:
            total = max(job.total, 1)
            results_live = job.results is not None
            expire_in = None
            if results_live and job.finished_mono is not None:
                expire_in = max(0.0, self.queue.result_ttl_s - (now - job.finished_mono))
                if job.all_fetched_mono is not None:
                    grace = min(FETCHED_GRACE_S, self.queue.result_ttl_s)
                    expire_in = min(expire_in, max(0.0, grace - (now - job.all_fetched_mono)))
            return JobStatus(
                id=job.id,
                state=job.state.value,
                progress=JobProgress(
                    step=job.step,
                    total=job.total,
                    fraction=min(1.0, job.step / total),
                    eta_s=job.eta_s(now),
                    note=job.note if job.state is JobState.RUNNING else None,
                ),
                error=job.error,
                error_field=job.error_field,
                queue_position=position,
                cancel_requested=job.cancel.is_set() and job.state is JobState.RUNNING,
                created_at=job.created_at,
                started_at=job.started_at,
                finished_at=job.finished_at,
                results=[
                    ResultInfo(
                        index=k, url=f"/v1/edits/{job.id}/results/{k}", available=results_live
                    )
                    for k in range(job.result_count)
                ],
                results_expire_in_s=expire_in,
                results_released=job.released_reason,
            )
