"""Throughput benchmark: the template's pattern against a bare loop and the naive pattern.

Run by hand, not part of the test suite (it takes about four minutes):

    .venv/bin/python tests/bench_throughput.py                 # latencies 0.1 and 0.02 s
    .venv/bin/python tests/bench_throughput.py --latency 0.05  # one latency

The fake platform runs in its own process with an added latency L on every data call.
For 1, 12 and 20 threads, in one run, side by side, it measures:

- template: the main pool, thread-local clients, the retry decorator and a tqdm bar,
  as a script built from the template does it (get_all_organizations in the pool);
- bare: threads each with its own keep-alive httpx.Client, none of the template;
- naive: a new httpx.Client for every call (its own TLS context, no keep-alive).

It prints calls per second (the median of 5 measures, the patterns taking turns: one
measure varies by up to 10% on a busy 2-core machine), the ideal (threads / L), each ratio
to the ideal, the template's ratio to the bare loop and the TCP connections the fake
accepted during the first measure. The template's pools reuse the clients of earlier
threads whose ids the new threads get, so it may open fewer connections than threads.
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from time import perf_counter

import httpx

ROOT = Path(__file__).resolve().parent.parent
THREAD_COUNTS = (1, 12, 20)
SECONDS_PER_MEASURE = 3.0  # how long each template or bare measure lasts at the ideal rate
REPEATS = 5  # each figure is the median of this many measures, the patterns taking turns
NAIVE_CALLS_PER_THREAD = 4  # the naive pattern is slow: a few calls tell its rate
ORGANIZATIONS = "/api/inclusions/getAllOrganizations"


def start_fake(latency, *options):
    """The fake platform in a child process, with these other command-line options;
    returns (process, {EB_...: url})."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_platform.py"), "--latency", str(latency), *options],
        stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    settings = {}
    for line in process.stdout:
        if line.startswith("EB_"):
            name, _, value = line.strip().partition("=")
            settings[name] = value
        if "EB_PASSWORD" in settings:
            return process, settings
    raise RuntimeError("the fake platform did not start")


def connections_accepted(settings):
    """TCP connections the fake's RC service accepted so far (asked of IAM, not to add one)."""
    stats = httpx.get(settings["EB_IAM_BASE_URL"] + "/_fake/stats", timeout=10).json()
    return stats["connections"]["RC"]


def log_in(settings):
    """The template module, pointed at the fake and logged in as an unattended script is."""
    os.environ.update(settings, EB_NON_INTERACTIVE="1")  # read by the first import
    sys.path.insert(0, str(ROOT))
    import eb_script_template as template

    for service, row in template.MICROSERVICES.items():
        row["base_url"] = settings[f"EB_{service}_BASE_URL"]
    assert template.login() == "Success"
    return template


def run_template(template, threads, calls):
    """The template's pattern: tasks in the main pool, results read as they complete."""
    with template.tqdm(total=calls, bar_format=template.custom_bar_format, disable=None, leave=False) as pbar:
        with template.StoppableThreadPool(max_workers=threads) as executor:
            futures = [executor.submit(template.get_all_organizations) for _ in range(calls)]
            for future in template.iter_completed(futures):
                future.result()
                pbar.update(1)


def run_bare(url, token, ssl_context, threads, calls):
    """Threads with their own keep-alive client, nothing else. The clients share one TLS
    context, as the template's do, so the comparison shows the template's machinery."""
    def worker(count):
        with httpx.Client(verify=ssl_context) as client:
            for _ in range(count):
                read_json(client, url, token)

    run_threads(worker, threads, calls // threads)


def run_naive(url, token, threads, calls):
    """A new client per call: the pattern the template's thread-local clients avoid."""
    def worker(count):
        for _ in range(count):
            with httpx.Client() as client:
                read_json(client, url, token)

    run_threads(worker, threads, calls // threads)


def read_json(client, url, token):
    """One call as a script makes it: the status checked, the JSON read."""
    response = client.get(url, headers={"Authorization": f"Bearer {token}"})
    response.raise_for_status()
    return response.json()


def run_threads(worker, threads, count):
    pool = [threading.Thread(target=worker, args=(count,)) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()


def measure(settings, calls, run, *args):
    """(calls, calls per second, connections the fake accepted) of run(*args, calls)."""
    before = connections_accepted(settings)
    started = perf_counter()
    run(*args, calls)
    rate = calls / (perf_counter() - started)
    return calls, rate, connections_accepted(settings) - before


HEADER = "threads   pattern  calls  calls/s  ideal  /ideal  /bare  conns"


def benchmark(latency, template, settings):
    url = settings["EB_RC_BASE_URL"] + ORGANIZATIONS
    token = template.tokens["RC"]["access_token"]
    ssl_context = template._shared_ssl_context()
    print(f"\nLatency L = {latency * 1000:.0f} ms")
    print(HEADER)
    for threads in THREAD_COUNTS:
        calls = threads * max(1, round(SECONDS_PER_MEASURE / latency))
        ideal = threads / latency
        runs = {
            "template": (calls, run_template, template, threads),
            "bare": (calls, run_bare, url, token, ssl_context, threads),
            "naive": (threads * NAIVE_CALLS_PER_THREAD, run_naive, url, token, threads),
        }
        measures = {pattern: [] for pattern in runs}
        for _ in range(REPEATS):
            for pattern, run in runs.items():
                measures[pattern].append(measure(settings, *run))
        results = {
            pattern: (found[0][0], statistics.median(rate for _, rate, _ in found), found[0][2])
            for pattern, found in measures.items()
        }
        bare_rate = results["bare"][1]
        for pattern, (count, rate, connections) in results.items():
            versus_bare = f"{rate / bare_rate:6.2f}" if pattern == "template" else " " * 6
            print(
                f"{threads:>7} {pattern:>9} {count:>6} {rate:8.1f} {ideal:6.0f} {rate / ideal:7.2f} "
                f"{versus_bare} {connections:>6}"
            )


def client_creation_cost(template):
    """Milliseconds to create a client: httpx's default vs the template's shared TLS context."""
    def per_client(make, count=20):
        started = perf_counter()
        for _ in range(count):
            make().close()
        return (perf_counter() - started) / count * 1000

    shared = template._shared_ssl_context()
    default_ms = per_client(httpx.Client)
    shared_ms = per_client(lambda: httpx.Client(verify=shared))
    print(f"\nClient creation: httpx default {default_ms:.1f} ms, with the shared TLS context {shared_ms:.2f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--latency", type=float, action="append", help="seconds (repeatable)")
    latencies = parser.parse_args().latency or [0.1, 0.02]
    print(f"Python {sys.version.split()[0]} on {os.cpu_count()} CPUs; httpx {httpx.__version__}")
    for latency in latencies:
        process, settings = start_fake(latency)
        try:
            template = log_in(settings)
            benchmark(latency, template, settings)
        finally:
            process.terminate()
            process.wait()
    client_creation_cost(template)


if __name__ == "__main__":
    main()
