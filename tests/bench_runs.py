"""Benchmark of what a run costs: login, the write journal, memory of many tasks, and the
time to exit after Ctrl+C and SIGTERM. Each figure is measured side by side with what it
is compared to, in one run.

Run by hand, not part of the test suite (about 30 seconds, Linux: it reads peak memory
with the resource module and sends POSIX signals):

    .venv/bin/python tests/bench_runs.py

The fake platform runs in its own process. It prints:

- login: the median time of 5 logins (IAM, then the config-tokens of RC and GDD) with
  an auth latency of 50 ms, config-tokens asked one after the other (as before) and in
  parallel (login() now);
- journal: writes per second of 2000 writes (update_record_fields on 8 threads with
  process_in_pool, a real run), with the journal, and with its line writer replaced by
  nothing; median of 3, taking turns;
- memory: peak RSS of a process that runs 10,000 and 100,000 quick tasks on 8 threads,
  each returning a small dict: submitted as a list and read with as_completed(), with
  iter_completed(), and with process_in_pool(); the RSS of the same process before any
  task is given for reference;
- exit: seconds from the signal to the exit of a copy whose 20 threads are each in a
  30 s call, for SIGINT (Ctrl+C) and SIGTERM, median of 3.
"""

import functools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from bench_throughput import log_in, start_fake  # noqa: E402 - after the path

ORGANIZATIONS = "/api/inclusions/getAllOrganizations"
WRITES = 2000


def bench_login(template):
    def sequential():
        master_token, user_id = template._log_in_to_iam(*credentials)
        for app in ("RC", "GDD"):
            template.tokens[app] = template._configure_token_with_retries(app, master_token, user_id)

    credentials = (template._credentials["user_name"], template._credentials["password"])
    timings = {"one after the other": [], "in parallel (login())": []}
    for _ in range(5):
        for name, function in (("one after the other", sequential), ("in parallel (login())", template.login)):
            started = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - started)
    print("Login with an auth latency of 50 ms (IAM login, then RC and GDD config-tokens), median of 5:")
    for name, values in timings.items():
        print(f"  config-tokens {name:<24} {statistics.median(values) * 1000:7.1f} ms")


def write(template, value, patient):
    return template.update_record_fields(patient, value)


def bench_journal(template):
    template.CHANGES_DATA = True
    pool = template.StoppableThreadPool(max_workers=8)
    patients = [f"pat-004-{number:04d}" for number in range(1, 131)]
    writes = [patients[number % len(patients)] for number in range(WRITES)]
    real_line_writer = template._append_journal_line
    rates = {"with the journal": [], "without (line writer replaced by nothing)": []}
    with tempfile.TemporaryDirectory() as directory:
        os.chdir(directory)
        for repeat in range(3):
            for name in rates:
                journaled = name == "with the journal"
                template._append_journal_line = real_line_writer if journaled else (lambda fields, sync=True: None)
                template.start_journal(dry_run=False)
                template._journal["resume"] = {}
                value = {"consentVersion": f"v{repeat}-{name}"}  # new writes, not skipped
                started = time.perf_counter()
                for _ in template.process_in_pool(pool, functools.partial(write, template, value), writes, "Writes"):
                    pass
                rates[name].append(WRITES / (time.perf_counter() - started))
                template._append_journal_line = real_line_writer
                template.end_journal(0)
        os.chdir(ROOT)
    pool.shutdown()
    print(f"Journal: {WRITES} writes on 8 threads, writes per second, median of 3:")
    for name, values in rates.items():
        print(f"  {name:<42} {statistics.median(values):7.0f}")


MEMORY_CHILD = """
import resource, sys
from concurrent.futures import as_completed
sys.path.insert(0, {root!r})
import eb_script_template as template

count, pattern = int(sys.argv[1]), sys.argv[2]
pool = template.StoppableThreadPool(max_workers=8)

def task(number):
    return {{"id": number, "name": f"record {{number}}", "fields": list(range(20))}}

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
total = 0
if pattern == "as_completed":
    futures = [pool.submit(task, number) for number in range(count)]
    for future in as_completed(futures):
        total += len(future.result()["fields"])
elif pattern == "iter_completed":
    futures = [pool.submit(task, number) for number in range(count)]
    for future in template.iter_completed(futures):
        total += len(future.result()["fields"])
else:
    for number, result in template.process_in_pool(pool, task, range(count)):
        total += len(result["fields"])
assert total == 20 * count
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_memory():
    code = MEMORY_CHILD.format(root=str(ROOT))
    print("Peak RSS of quick tasks on 8 threads (MB; 'before' is the process before any task):")
    print(f"  {'tasks':>7}  {'pattern':<34} {'before':>7} {'peak':>7}")
    for count in (10_000, 100_000):
        for pattern, label in (("as_completed", "list + as_completed()"), ("iter_completed", "list + iter_completed()"),
                               ("process_in_pool", "process_in_pool()")):
            result = subprocess.run([sys.executable, "-c", code, str(count), pattern], capture_output=True,
                                    text=True, check=True, stdin=subprocess.DEVNULL)
            before, peak = (int(value) / 1024 for value in result.stdout.split())
            print(f"  {count:>7}  {label:<34} {before:7.1f} {peak:7.1f}")


BUSY_JOB = """\
    with main_thread_pool as executor:
        futures = [executor.submit(get_all_organizations) for _ in range(400)]
        for future in iter_completed(futures):
            future.result()
"""


def bench_exit(settings):
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_copy

    print("Seconds from the signal to the exit, 20 threads each in a 30 s call, median of 3:")
    for stop in (signal.SIGINT, signal.SIGTERM):
        timings = []
        for _ in range(3):
            with tempfile.TemporaryDirectory() as directory:
                script = write_copy(directory, BUSY_JOB)
                environment = dict(os.environ, **settings, EB_THREADS="20", EB_NON_INTERACTIVE="1")
                calls_before = calls(settings)
                process = subprocess.Popen([sys.executable, script.name], cwd=directory, env=environment,
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, preexec_fn=restore_sigint)
                while calls(settings) < calls_before + 20:
                    time.sleep(0.05)
                time.sleep(0.5)
                signalled = time.perf_counter()
                process.send_signal(stop)
                process.wait(timeout=60)
                timings.append(time.perf_counter() - signalled)
                assert process.returncode in (130, 143), process.returncode
        print(f"  {stop.name:<8} {statistics.median(timings):5.2f} s  (each: {', '.join(f'{t:.2f}' for t in timings)})")


def restore_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a shell's background job starts with it ignored


def calls(settings):
    stats = httpx.get(settings["EB_IAM_BASE_URL"] + "/_fake/stats", timeout=10).json()
    return stats["calls"].get(f"RC {ORGANIZATIONS}", 0)


def main():
    print(f"Python {sys.version.split()[0]}, httpx {httpx.__version__}, {os.cpu_count()} cores")
    fake, settings = start_fake(0.0, "--auth-latency", "0.05")
    try:
        bench_login(log_in(settings))
    finally:
        fake.terminate()
    fake, settings = start_fake(0.0)
    try:
        import eb_script_template as template

        for service, row in template.MICROSERVICES.items():
            row["base_url"] = settings[f"EB_{service}_BASE_URL"]
        assert template.login() == "Success"
        bench_journal(template)
    finally:
        fake.terminate()
    bench_memory()
    fake, settings = start_fake(30.0)
    try:
        bench_exit(settings)
    finally:
        fake.terminate()


if __name__ == "__main__":
    main()
