"""Time query-status round trips with the qemu.qmp library, for the qmp_roundtrip benchmark.

Usage: qmp_python.py SOCKET

Connects to the QMP socket, then reads one number N per line from stdin, runs N sequential
query-status calls and prints their round-trip times in nanoseconds on one line, separated by
spaces. The connection stays open between batches, so batches can be interleaved with other
clients. Exits at the end of stdin.
"""

import asyncio
import sys
import time

try:
    from qemu.qmp import QMPClient
except ImportError:
    sys.exit("qemu.qmp is missing: install it with `pip install qemu.qmp==0.0.6`")


async def main(socket_path: str) -> None:
    client = QMPClient("bench")
    await client.connect(socket_path)
    try:
        for line in sys.stdin:
            calls = int(line)
            samples = []
            for _ in range(calls):
                started = time.perf_counter_ns()
                await client.execute("query-status")
                samples.append(time.perf_counter_ns() - started)
            print(" ".join(map(str, samples)), flush=True)
    finally:
        await client.disconnect()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(sys.argv[1]))
