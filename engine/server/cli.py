"""`instruct-edit serve`: the command-line front of the HTTP service.

The lead's `engine/cli.py` calls `add_serve_arguments(parser)` and `run_serve(args)`. The one
line on stdout is `listening on http://HOST:PORT` (https with TLS), printed once the socket
accepts connections; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from engine.manifest import DEFAULT_MODEL
from engine.server import settings as defaults
from engine.server.auth import TokenError, default_token_path, is_loopback, load_token
from engine.server.settings import ServerSettings

DEFAULT_PORT = 8765
MEMORY_PLANS = ("auto", "full", "offload-text", "model-offload", "sequential-offload")
QUANTIZATIONS = ("none", "bnb-8bit", "bnb-4bit", "torchao-int8", "gguf")
_MEMORY_SAVING_PLANS = {
    "auto": "auto",
    "off": "full",
    "slicing": "full",
    "offload": "model-offload",
}
PARENT_POLL_S = 1.0
# Exit status when a device worker died or the GPU reported a fatal error (restart the engine).
EXIT_WORKER_FAILED = 3
log = logging.getLogger("instruct_edit.serve")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    net = parser.add_argument_group("network and security")
    net.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only)",
    )
    net.add_argument(
        "--port",
        metavar="N",
        type=int,
        default=DEFAULT_PORT,
        help=f"port (default {DEFAULT_PORT}; 0 = any free port)",
    )
    token = net.add_mutually_exclusive_group()
    token.add_argument(
        "--token",
        help="the access token clients must send (prefer --token-file: argv is visible to others)",
    )
    token.add_argument(
        "--token-file",
        metavar="FILE",
        type=Path,
        help="file holding the token; created with a new random token (mode 0600) if missing",
    )
    net.add_argument(
        "--allowed-host",
        metavar="NAME",
        action="append",
        default=[],
        help="a further name clients reach the server by (its Host header); repeatable. "
        "Requests naming any other host are refused (DNS rebinding). Always accepted: the --host "
        "address; on loopback 127.0.0.1, localhost and [::1]; on 0.0.0.0/:: any IP address",
    )
    net.add_argument(
        "--tls-cert", metavar="PEM", type=Path, help="TLS certificate (PEM) to serve https"
    )
    net.add_argument(
        "--tls-key", metavar="PEM", type=Path, help="TLS private key (PEM) for --tls-cert"
    )

    models = parser.add_argument_group("models and devices")
    models.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"default model: hub id, diffusers folder or .safetensors file (default {DEFAULT_MODEL})",
    )
    models.add_argument(
        "--models-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder of models clients may choose by name (diffusers folders, .safetensors files); repeatable",
    )
    models.add_argument(
        "--loras-dir",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="folder of LoRA .safetensors files clients may use by name; repeatable",
    )
    models.add_argument(
        "--data-dir",
        type=Path,
        metavar="DIR",
        help="the engine's state folder: training jobs, trained LoRAs (DIR/loras, always a LoRA "
        "folder), datasets (default: the folder of the default token file)",
    )
    models.add_argument("--device", default="auto", help="auto|cpu|cuda|cuda:N|mps (default auto)")
    models.add_argument(
        "--devices",
        metavar="LIST",
        help="comma-separated devices, one worker each (e.g. cuda:0,cuda:1); overrides --device",
    )
    models.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="precision (default auto)",
    )
    models.add_argument(
        "--compile",
        default="off",
        choices=("off", "default", "max-autotune", "reduce-overhead"),
        help="torch.compile the UNet of InstructPix2Pix models (GPU; one warm-up per model, every working size reuses it): default, max-autotune, reduce-overhead (CUDA graphs)",
    )
    models.add_argument(
        "--runtime",
        default=None,
        choices=("auto", "torch", "openvino", "openvino-int8"),
        help="what runs the networks: auto = OpenVINO on a CPU for InstructPix2Pix models (faster than PyTorch there; the first use of a model converts it once, cached), else PyTorch; openvino-int8 also quantizes the UNet to int8 (about 3x faster again on CPUs with VNNI, small changes to the result; first use calibrates for a minute or two; needs nncf)",
    )
    models.add_argument(
        "--memory-plan",
        default=None,
        choices=MEMORY_PLANS,
        help="what stays on the GPU: full, offload-text (text encoders in RAM), model-offload, "
        "sequential-offload (slowest, least VRAM); default auto: chosen from free VRAM",
    )
    models.add_argument(
        "--quantization",
        default="none",
        choices=QUANTIZATIONS,
        help="load the large components quantized: bnb-8bit/bnb-4bit (bitsandbytes, CUDA), "
        "torchao-int8, gguf (a .gguf transformer file); default none",
    )
    models.add_argument(
        "--memory-saving",
        default="auto",
        choices=("auto", "off", "slicing", "offload"),
        help="older name of --memory-plan (off/slicing = full, offload = model-offload)",
    )
    models.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow pickle-based .ckpt/.bin models, which can run code when loaded (trusted files only)",
    )
    models.add_argument(
        "--allow-downloads",
        action="store_true",
        help="let a request name a hub model (or preset LoRA) that is not in the local Hugging "
        "Face cache, which the server then downloads; without it such a request is refused. "
        "The default --model is always fetched when missing (at start-up)",
    )
    models.add_argument(
        "--max-loaded-models",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_MAX_LOADED_MODELS,
        help=f"models kept loaded per device (default {defaults.DEFAULT_MAX_LOADED_MODELS})",
    )
    models.add_argument(
        "--no-preload",
        dest="preload",
        action="store_false",
        help="load the default model with the first edit instead of at start-up",
    )

    limits = parser.add_argument_group("queue and limits")
    limits.add_argument(
        "--queue-size",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_QUEUE_SIZE,
        help=f"edits that may wait; more get 429 (default {defaults.DEFAULT_QUEUE_SIZE})",
    )
    limits.add_argument(
        "--result-ttl",
        type=float,
        default=defaults.DEFAULT_RESULT_TTL_S,
        metavar="SECONDS",
        help=f"how long unfetched results are kept (default {defaults.DEFAULT_RESULT_TTL_S:g})",
    )
    limits.add_argument(
        "--result-memory-mb",
        metavar="MB",
        type=float,
        default=defaults.DEFAULT_RESULT_MEMORY_MB,
        help=f"memory for kept results (default {defaults.DEFAULT_RESULT_MEMORY_MB})",
    )
    limits.add_argument(
        "--max-upload-mb",
        metavar="MB",
        type=float,
        default=defaults.DEFAULT_MAX_UPLOAD_MB,
        help=f"largest request body (default {defaults.DEFAULT_MAX_UPLOAD_MB})",
    )
    limits.add_argument(
        "--max-image-pixels",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_MAX_IMAGE_PIXELS,
        help=f"largest image, width × height (default {defaults.DEFAULT_MAX_IMAGE_PIXELS})",
    )
    limits.add_argument(
        "--max-variant-pixels",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_MAX_VARIANT_PIXELS,
        help="largest image pixels × variants of one edit "
        f"(default {defaults.DEFAULT_MAX_VARIANT_PIXELS}: four 8192² results)",
    )
    limits.add_argument(
        "--max-queued-memory-mb",
        metavar="MB",
        type=float,
        default=defaults.DEFAULT_MAX_QUEUED_MEMORY_MB,
        help="host memory for waiting and running edits (images, results, working copies; "
        f"estimated from pixels); more get 429 (default {defaults.DEFAULT_MAX_QUEUED_MEMORY_MB})",
    )
    limits.add_argument(
        "--max-decoding-uploads",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_MAX_DECODING_UPLOADS,
        help=f"uploads decoded at once (default {defaults.DEFAULT_MAX_DECODING_UPLOADS})",
    )
    limits.add_argument(
        "--max-loras-loaded",
        metavar="N",
        type=int,
        default=defaults.DEFAULT_MAX_LORAS_LOADED,
        help="LoRA adapters kept loaded per model; the least recently used is unloaded past "
        f"this (default {defaults.DEFAULT_MAX_LORAS_LOADED})",
    )
    parser.add_argument(
        "--parent-pid",
        metavar="PID",
        type=int,
        help="exit when the process with this id ends (used by the Krita plugin)",
    )
    parser.add_argument(
        "--log-level", default="warning", choices=("debug", "info", "warning", "error")
    )


class ServeError(Exception):
    """A start-up problem the operator can fix; printed as one line, exit status 2."""


def _settings_from_args(args: argparse.Namespace) -> tuple[ServerSettings, str]:
    try:
        source = load_token(args.token, args.token_file)
    except TokenError as err:
        raise ServeError(str(err)) from err
    if not is_loopback(args.host) and not source.explicit:
        if source.generated and source.path is not None:
            source.path.unlink(missing_ok=True)  # ours, just made: do not leave it behind
        raise ServeError(
            f"--host {args.host} makes the service reachable from other machines; give the token "
            "explicitly with --token-file FILE (or --token), and consider --tls-cert/--tls-key"
        )
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ServeError("--tls-cert and --tls-key go together; give both or neither")
    if args.allow_pickle:
        from engine.errors import EngineError
        from engine.sources import require_safe_torch_load

        try:
            require_safe_torch_load()
        except EngineError as err:
            raise ServeError(err.message) from err
    from engine.server.middleware import host_name

    for name in args.allowed_host:
        if host_name(name) is None or "/" in name:
            raise ServeError(
                f"--allowed-host {name!r} is not a host name or address (e.g. "
                "studio.local or 192.168.1.20)"
            )
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise ServeError(f"TLS file {path} does not exist")
    for folder in [*args.models_dir, *args.loras_dir]:
        if not folder.is_dir():
            raise ServeError(
                f"folder {folder} does not exist (given with --models-dir/--loras-dir)"
            )
    devices = tuple(d.strip() for d in (args.devices or args.device).split(",") if d.strip())
    if not devices:
        raise ServeError("--devices is empty; give e.g. cuda:0,cuda:1")
    if args.parent_pid is not None and not pid_alive(args.parent_pid):
        raise ServeError(f"--parent-pid {args.parent_pid}: no such process")
    _check_devices(devices, args.dtype)
    _check_quantization(args.quantization)
    memory_plan = args.memory_plan or _MEMORY_SAVING_PLANS[args.memory_saving]
    try:
        settings = ServerSettings(
            token=source.token,
            model=args.model,
            devices=devices,
            dtype=args.dtype,
            runtime=args.runtime,
            compile=args.compile,
            memory_plan=memory_plan,
            quantization=args.quantization,
            allow_pickle=args.allow_pickle,
            queue_size=args.queue_size,
            models_dirs=tuple(p.resolve() for p in args.models_dir),
            loras_dirs=tuple(p.resolve() for p in args.loras_dir),
            result_ttl_s=args.result_ttl,
            result_memory_mb=args.result_memory_mb,
            max_upload_mb=args.max_upload_mb,
            max_image_pixels=args.max_image_pixels,
            max_loaded_models=args.max_loaded_models,
            max_variant_pixels=args.max_variant_pixels,
            max_queued_memory_mb=args.max_queued_memory_mb,
            max_decoding_uploads=args.max_decoding_uploads,
            max_loras_loaded=args.max_loras_loaded,
            preload=args.preload,
            token_file=source.path.resolve() if source.path is not None else None,
            host=args.host,
            allowed_hosts=tuple(args.allowed_host),
            allow_downloads=args.allow_downloads,
            data_dir=(args.data_dir or default_token_path().parent).expanduser().resolve(),
        )
    except ValueError as err:
        raise ServeError(str(err)) from err
    if source.path is not None:
        what = "generated a new token in" if source.generated else "token file:"
        print(f"{what} {source.path}", file=sys.stderr, flush=True)
    if not is_loopback(args.host) and args.tls_cert is None:
        print(
            f"warning: serving on {args.host} without TLS: the token and the images cross the "
            "network readable by anyone on it; use --tls-cert/--tls-key (or a TLS proxy, or an "
            "SSH tunnel to 127.0.0.1) unless this network is yours alone",
            file=sys.stderr,
            flush=True,
        )
    return settings, "https" if args.tls_cert else "http"


def _check_devices(devices: tuple[str, ...], dtype: str) -> None:
    """Refuse an unusable device or precision now, not with the first edit."""
    from engine.devices import resolve_device, resolve_dtype
    from engine.errors import InvalidInput

    for device in devices:
        try:
            resolve_dtype(dtype, resolve_device(device))
        except InvalidInput as err:
            raise ServeError(err.message) from err


def _check_quantization(name: str) -> None:
    """Refuse a quantization whose backend is missing or needs a GPU this machine lacks."""
    if name == "none":
        return
    from engine.errors import InvalidInput
    from engine.quantization import quantization_config

    try:
        quantization_config(name, ("transformer",))
    except InvalidInput as err:
        raise ServeError(err.message) from err


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    if sys.platform == "win32":
        import ctypes

        # os.kill(pid, 0) would terminate the process on Windows; ask for its exit code instead.
        kernel32 = ctypes.windll.kernel32  # type: ignore[attr-defined]
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def watch_parent(
    pid: int, on_gone: Callable[[], None], interval: float = PARENT_POLL_S
) -> threading.Thread:
    original_ppid = os.getppid()

    def poll() -> None:
        while True:
            # Reparenting (our parent died and init adopted us) counts too: a dead parent can
            # linger as a zombie that still answers kill(pid, 0).
            reparented = pid == original_ppid and os.getppid() != original_ppid
            if reparented or not pid_alive(pid):
                on_gone()
                return
            time.sleep(interval)

    thread = threading.Thread(target=poll, name="instruct-edit-parent-watch", daemon=True)
    thread.start()
    return thread


def run_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        settings, scheme = _settings_from_args(args)
        sock = bind_listening_socket(args.host, args.port)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2

    import uvicorn

    from engine.server.app import create_app

    if args.log_level != "debug":
        from engine.console import quiet_loading_bars

        quiet_loading_bars(keep_download_bars=False)
    app = create_app(settings)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    listening_line = f"listening on {scheme}://{shown_host}:{port}"

    class AnnouncingServer(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(listening_line, flush=True)

    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        ssl_certfile=str(args.tls_cert) if args.tls_cert else None,
        ssl_keyfile=str(args.tls_key) if args.tls_key else None,
        timeout_graceful_shutdown=3,
        # No `server: uvicorn` header: nothing for a scanner to fingerprint.
        server_header=False,
    )
    server = AnnouncingServer(config)
    worker_failures: list[str] = []

    def worker_failed(reason: str) -> None:
        # A dead worker (or a GPU in a fatal state) cannot recover inside this process: exit
        # non-zero so that whoever manages the engine (the Krita plugin) starts a fresh one.
        worker_failures.append(reason)
        print(f"error: {reason}; exiting so that the engine restarts", file=sys.stderr, flush=True)
        server.should_exit = True

    app.state.service.pool.on_fatal = worker_failed
    if args.parent_pid is not None:

        def parent_gone() -> None:
            print(
                f"parent process {args.parent_pid} ended; shutting down",
                file=sys.stderr,
                flush=True,
            )
            server.should_exit = True

        watch_parent(args.parent_pid, parent_gone)
    try:
        asyncio.run(server.serve(sockets=[sock]))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    if worker_failures:
        return EXIT_WORKER_FAILED
    if not server.started:
        print("error: the service failed to start; see the messages above", file=sys.stderr)
        return 1
    return 0


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """Bind ourselves (not uvicorn), so `--port 0` yields the real port before start-up.

    The socket comes from getaddrinfo so that it carries proto=IPPROTO_TCP: asyncio sets
    TCP_NODELAY on accepted connections only then, and without it every small response
    waits ~40 ms for the client's delayed ACK (Nagle)."""
    if not 0 <= port <= 65535:
        raise ServeError(f"--port {port} is not a port number (0-65535; 0 = any free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ServeError(f"--host {host}: {err}") from err
    family, socktype, proto, _, address = infos[0]
    sock = socket.socket(family, socktype, proto)
    if sys.platform != "win32":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ServeError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; choose another --port"
        ) from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
