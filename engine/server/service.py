"""The running service's parts, bundled: settings, model catalogue, job queue and device workers."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.manifest import API_VERSION, MANIFEST
from engine.server.catalog import ModelCatalog
from engine.server.jobs import FETCHED_GRACE_S, Job, JobQueue, JobState
from engine.server.schema import (
    Health,
    JobProgress,
    JobStatus,
    ModelInfo,
    ModelLoadState,
    ModelsResponse,
    QueueStats,
    ResultInfo,
)
from engine.server.settings import ServerSettings
from engine.server.workers import WorkerPool


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

    def health(self) -> Health:
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
        devices = [describe_device(d) for d in self.settings.devices]
        return Health(
            status=status,
            name=str(MANIFEST["name"]),
            version=str(MANIFEST["version"]),
            api_version=API_VERSION,
            devices=devices,
            device=devices[0],
            model=self.settings.model,
            loaded_models=self.pool.loaded_models(),
            model_loads=[
                ModelLoadState(
                    model=r.model,
                    device=describe_device(r.device),
                    state=r.state,  # type: ignore[arg-type]
                    elapsed_s=round(r.elapsed_s(now), 3),
                    error=r.error,
                )
                for r in records
            ],
            queue=QueueStats(**self.queue.stats()),
        )

    def models(self) -> ModelsResponse:
        loaded = set(self.pool.loaded_models())
        default_id = self.catalog.resolve_model(None).id
        return ModelsResponse(
            default_model=default_id,
            models=[
                ModelInfo(
                    id=entry.id,
                    name=entry.name,
                    source=entry.source,  # type: ignore[arg-type]
                    architecture=entry.architecture,
                    licence=entry.licence,
                    description=entry.description,
                    default=entry.id == default_id,
                    available_locally=self.catalog.is_available_locally(entry),
                    loaded=entry.target in loaded,
                )
                for entry in self.catalog.entries()
            ],
            loras=sorted(self.catalog.loras()),
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
