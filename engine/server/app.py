"""`create_app(settings, editor_factory=...)`: the FastAPI application of the engine service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from engine.manifest import MANIFEST
from engine.server.catalog import ModelCatalog
from engine.server.errors import install_error_handlers
from engine.server.jobs import JobQueue
from engine.server.middleware import HostCheck, TokenGate, UploadLimit
from engine.server.routes import protected, public
from engine.server.schema import EditParamsSchema, JobEvent
from engine.server.service import Service
from engine.server.settings import ServerSettings
from engine.server.training_routes import TrainingRequest
from engine.server.training_routes import router as training_router
from engine.server.trainings import TrainingManager
from engine.server.workers import EditorFactory, WorkerPool, real_editor_factory

SWEEP_INTERVAL_S = 1.0


def create_app(
    settings: ServerSettings,
    editor_factory: EditorFactory | None = None,
    catalog: ModelCatalog | None = None,
) -> FastAPI:
    """The service as an ASGI app. Workers start with the app's lifespan (uvicorn, or
    `with TestClient(app)`), so creating an app loads nothing."""
    loras_dirs = settings.loras_dirs
    if settings.data_dir is not None and settings.data_dir / "loras" not in loras_dirs:
        # A finished training's LoRA lands in <data-dir>/loras: always one of the LoRA folders.
        loras_dirs = (*loras_dirs, settings.data_dir / "loras")
    catalog = catalog or ModelCatalog(
        settings.model,
        settings.models_dirs,
        loras_dirs,
        settings.allow_pickle,
        allow_downloads=settings.allow_downloads,
    )
    queue = JobQueue(
        settings.queue_size,
        settings.result_ttl_s,
        settings.result_memory_bytes,
        memory_budget_bytes=settings.max_queued_memory_bytes,
    )
    default_model = catalog.resolve_model(None) if settings.preload else None
    pool = WorkerPool(
        settings, queue, editor_factory or real_editor_factory(settings), default_model
    )
    service = Service(settings=settings, catalog=catalog, queue=queue, pool=pool)
    trainings = TrainingManager(settings, catalog, queue)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        pool.start()
        trainings.start()

        async def sweep_forever() -> None:
            # Releases expired results even when no request comes in.
            while True:
                await asyncio.sleep(SWEEP_INTERVAL_S)
                queue.sweep()

        sweeper = asyncio.create_task(sweep_forever())
        try:
            yield
        finally:
            sweeper.cancel()
            await asyncio.get_running_loop().run_in_executor(None, trainings.stop)
            await asyncio.get_running_loop().run_in_executor(None, pool.stop)

    app = FastAPI(
        title="Instruct Edit engine",
        version=str(MANIFEST["version"]),
        summary="InstructPix2Pix image editing over HTTP (API version 1).",
        lifespan=lifespan,
        openapi_url="/openapi.json",
        # The interactive pages load scripts from a CDN; the schema itself is what clients need.
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.service = service
    app.state.trainings = trainings
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(protected)
    app.include_router(training_router)
    # Outermost first: refuse a foreign Host (DNS rebinding), then oversize bodies, then check
    # the token, before any parsing.
    app.add_middleware(TokenGate, token=settings.token)
    app.add_middleware(UploadLimit, limit=settings.max_upload_bytes)
    app.add_middleware(HostCheck, bound=settings.host, allowed=settings.allowed_hosts)
    _document_edit_params(app)
    return app


def _document_edit_params(app: FastAPI) -> None:
    """Finish the generated OpenAPI schema: the EditParams schema (the JSON in the `params`
    form field), the JSON payload of server-sent events, and JSON error bodies on the routes
    whose success answer is not JSON (FastAPI labels those with the success media type)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model, name in (
            (EditParamsSchema, "EditParams"),
            (JobEvent, "JobEvent"),
            (TrainingRequest, "TrainingRequest"),
        ):
            definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for sub_name, sub_definition in definition.pop("$defs", {}).items():
                components.setdefault(sub_name, sub_definition)
            components[name] = definition
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for status, response in operation.get("responses", {}).items():
                content = response.get("content", {})
                if status.isdigit() and int(status) >= 400:
                    for media_type in [m for m in content if m != "application/json"]:
                        content["application/json"] = content.pop(media_type)
                stream = content.get("text/event-stream")
                if stream and "itemSchema" in stream:
                    stream["itemSchema"]["properties"]["data"] = {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": {"$ref": "#/components/schemas/JobEvent"},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
