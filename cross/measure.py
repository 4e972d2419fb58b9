#!/usr/bin/env python3
"""Client side of cross/test.sh and images/test-boot.sh: talks to an agent's local API.

  measure.py wait URL --since EPOCH_S --timeout S   seconds from EPOCH_S to the first 200 answer
  measure.py answer URL ROWS_JSON                   the answer's outputs for those rows, as JSON
  measure.py latency URL N                          p50 and p95 in microseconds of N one-row
                                                    requests, one after another, on one keep-alive
                                                    connection
  measure.py compare A_JSON B_JSON TOLERANCE        exit 1 unless every output differs by <= TOLERANCE
"""
import http.client
import json
import statistics
import sys
import time
import urllib.parse

ROW = [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]


def post(conn, path, rows):
    body = json.dumps({"inputs": rows})
    conn.request("POST", path, body, {"content-type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def connect(url):
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=30), parts.path or "/v1/infer"


def wait(url, since, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            conn, path = connect(url)
            status, _ = post(conn, path, [ROW])
            conn.close()
            if status == 200:
                print(f"{time.time() - since:.2f}")
                return 0
        except OSError:
            pass
        time.sleep(0.05)
    print(f"no answer from {url} within {timeout} s", file=sys.stderr)
    return 1


def answer(url, rows_json):
    conn, path = connect(url)
    status, body = post(conn, path, json.loads(rows_json))
    if status != 200:
        print(f"{url} answered {status}: {body[:200]!r}", file=sys.stderr)
        return 1
    print(json.dumps(json.loads(body)["outputs"]))
    return 0


def latency(url, n):
    conn, path = connect(url)
    for _ in range(20):  # warm-up: connection, caches, the engine threads' wake-up
        post(conn, path, [ROW])
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        status, _ = post(conn, path, [ROW])
        samples.append((time.perf_counter() - start) * 1e6)
        if status != 200:
            print(f"{url} answered {status}", file=sys.stderr)
            return 1
    samples.sort()
    print(f"{statistics.median(samples):.0f} {samples[int(len(samples) * 0.95)]:.0f}")
    return 0


def compare(a_json, b_json, tolerance):
    a, b = json.loads(a_json), json.loads(b_json)
    worst = max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
    print(f"largest difference {worst:.3g} (tolerance {tolerance})")
    return 0 if worst <= tolerance else 1


def main(argv):
    command = argv[1] if len(argv) > 1 else ""
    if command == "wait" and len(argv) == 7:
        return wait(argv[2], float(argv[4]), float(argv[6]))
    if command == "answer" and len(argv) == 4:
        return answer(argv[2], argv[3])
    if command == "latency" and len(argv) == 4:
        return latency(argv[2], int(argv[3]))
    if command == "compare" and len(argv) == 5:
        return compare(argv[2], argv[3], float(argv[4]))
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
