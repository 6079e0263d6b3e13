"""``python -m kube_emulator --listen kubectl=0 --listen op-a=0 --state FILE --log FILE``

``--seed FILE`` (JSON lines, one object each, apiVersion and kind included) creates those
objects before the listeners open, each as a create through the API would (see
``ApiServer.seed``): the benchmarks' 10,000 Services without 10,000 HTTP requests.

Serves the emulated API server on loopback, one port per named listener (so the request log
tells the clients apart), writes ``{"pid": ..., "listeners": {NAME: PORT}}`` to the state file
once every port listens, and runs until SIGTERM or SIGINT. SIGSTOP/SIGCONT freeze and thaw it,
which is what a hung API server looks like to its clients.
"""

import argparse
import asyncio
import json
import os
import signal
import time

import kmock

from .server import ApiServer, install_path_parser


async def main(args) -> None:
    install_path_parser()
    api = ApiServer(history_limit=args.history, bookmark_seconds=args.bookmark_seconds, log_path=args.log)
    if args.seed:
        started = time.monotonic()
        with open(args.seed) as f:
            count = api.seed((json.loads(line) for line in f if line.strip()), args.seed_manager)
        print(f"seeded {count} objects from {args.seed} in {time.monotonic() - started:.1f}s", flush=True)
    servers = []
    async with api.handler:
        for spec in args.listen:
            name, _, port = spec.partition("=")
            server = kmock.Server(api.handler, host=args.host, port=int(port or 0))
            await server.__aenter__()
            api.listeners[server.port] = name
            servers.append((name, server))
        state = {"pid": os.getpid(), "listeners": {name: s.port for name, s in servers}}
        if args.state:
            tmp = args.state + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, args.state)
        print(json.dumps(state), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        for _, server in servers:
            await server.__aexit__(None, None, None)


def cli() -> None:
    parser = argparse.ArgumentParser(prog="kube_emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--listen", action="append", default=[], help="NAME=PORT (0: any free port); repeatable")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--state", help="where to write the pid and the ports once listening")
    parser.add_argument("--log", help="the JSON-lines request log")
    parser.add_argument("--history", type=int, default=5000, help="events kept for watches to resume from")
    parser.add_argument("--bookmark-seconds", type=float, default=10.0)
    parser.add_argument("--seed", help="JSON lines of objects to create before listening")
    parser.add_argument("--seed-manager", default="seed", help="the field manager of the seeded objects")
    args = parser.parse_args()
    if not args.listen:
        args.listen = ["default=0"]
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
