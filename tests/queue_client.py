"""Client for the live waiting-queue test, run as its own process.

    python tests/queue_client.py URL MODEL < prompts.json   ->  one JSON line

Sends a long blocker generation, then the arrivals (name -> prompt, in the given
order) 0.1 s apart, and prints {"done": [[name, t], ...], "sent": [[name, t], ...]}
with monotonic times. It is a separate process because inside the full pytest run the
client's threads were at times not scheduled until the blocker had finished (seen
only there, never with the test file alone), so the arrivals never queued behind it.
"""
from __future__ import annotations

import json
import sys
import threading
import time

import requests


def main() -> int:
    url, model = sys.argv[1], sys.argv[2]
    arrivals = json.load(sys.stdin)  # [[name, prompt], ...]
    done, sent, lock = [], [], threading.Lock()

    def send(name: str, prompt: str, max_tokens: int, **extra) -> None:
        body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        r = requests.post(url + "/v1/completions", json=body, timeout=300)
        with lock:
            done.append([name, time.monotonic(), r.status_code])

    # A long generation occupies the only running slot while the others queue up.
    blocker = threading.Thread(target=send, args=("blocker", "Tell a long story.", 3500),
                               kwargs={"ignore_eos": True})
    sent.append(["blocker", time.monotonic()])
    blocker.start()
    time.sleep(1.0)
    threads = []
    for name, prompt in arrivals:
        t = threading.Thread(target=send, args=(name, prompt, 1))
        t.start()
        sent.append([name, time.monotonic()])
        threads.append(t)
        time.sleep(0.1)  # spaces arrivals at the engine
    for t in threads + [blocker]:
        t.join(600)
    print(json.dumps({"done": done, "sent": sent}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
