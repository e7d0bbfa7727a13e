#!/usr/bin/env bash
# csrc/tests/run.sh - build the C core + stress.c and run it.
#
#   run.sh [plain|asan|tsan|all] [stress args...]      (default: all)
#
# Configurations (all -std=c11 -Wall -Wextra -Werror -g -pthread -DUPIPE_TEST_HOOKS):
#   plain  -O2
#   asan   -O1 -fsanitize=address,undefined -fno-sanitize-recover=all
#   tsan   -O1 -fsanitize=thread
# Binaries go to $UPIPE_TEST_BUILD (default csrc/tests/bin/, gitignored), one dir per config.
# Environment passed on to stress: UPIPE_STRESS_ITERS, UPIPE_STRESS_TIMEOUT, UPIPE_STRESS_SEED,
# UPIPE_STRESS_VERBOSE. CC overrides the compiler (default gcc).
#
# Exit: 0 pass, 1 fail, 77 skip (the sanitizer runtime is missing or cannot run here). With
# "all": 1 if any config failed, 77 only if every config skipped, else 0.
set -u

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CSRC="$(dirname "$HERE")"
BUILD="${UPIPE_TEST_BUILD:-$HERE/bin}"
CC="${CC:-gcc}"
SOURCES=("$CSRC/upipe.c" "$CSRC/upipe_ring.c" "$CSRC/upipe_futex.c" "$CSRC/upipe_layout.c")
# UPIPE_TEST_HOOKS: upipe.c calls back into stress.c at one point (upipe_test_look_between; tests
# only, never in the Python build).
COMMON=(-std=c11 -Wall -Wextra -Werror -g -pthread -DUPIPE_TEST_HOOKS -I"$CSRC")

skip() { echo "SKIP [$1]: $2" >&2; return 77; }

flags_for() {
    case "$1" in
        plain) echo "-O2" ;;
        asan) echo "-O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all" ;;
        tsan) echo "-O1 -fno-omit-frame-pointer -fsanitize=thread" ;;
        *) return 1 ;;
    esac
}

# Does the toolchain link and run a trivial program with these flags? (libasan/libtsan present)
probe() {
    local cfg="$1" dir="$2"
    # shellcheck disable=SC2046
    printf 'int main(void){return 0;}\n' >"$dir/probe.c"
    "$CC" $(flags_for "$cfg") "$dir/probe.c" -o "$dir/probe" >"$dir/probe.log" 2>&1
}

run_config() {
    local cfg="$1"; shift
    local dir="$BUILD/$cfg" flags
    flags="$(flags_for "$cfg")" || { echo "unknown configuration: $cfg" >&2; return 1; }
    mkdir -p "$dir" || return 1
    if ! probe "$cfg" "$dir"; then
        skip "$cfg" "$CC cannot build with '$flags' (sanitizer runtime missing?): $(head -c 300 "$dir/probe.log")"
        return
    fi
    # shellcheck disable=SC2086
    if ! "$CC" "${COMMON[@]}" $flags "${SOURCES[@]}" "$HERE/stress.c" -o "$dir/stress" 2>"$dir/build.log"; then
        echo "FAIL [$cfg]: build failed:" >&2
        cat "$dir/build.log" >&2
        return 1
    fi
    local -a env_extra=()
    case "$cfg" in
        asan)
            # detect_leaks: every handle and buffer is released, so LSan must stay quiet.
            env_extra=(ASAN_OPTIONS="abort_on_error=0:halt_on_error=1:detect_leaks=1:exitcode=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
                       UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:exitcode=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}")
            ;;
        tsan)
            # tsan.supp is empty on purpose: it explains why, and what may ever go in it.
            env_extra=(TSAN_OPTIONS="halt_on_error=1:exitcode=1:second_deadlock_stack=1:history_size=4:suppressions=$HERE/tsan.supp${TSAN_OPTIONS:+:$TSAN_OPTIONS}")
            ;;
    esac
    local out rc
    out="$(env "${env_extra[@]}" "$dir/stress" "$@" 2>&1)"; rc=$?
    if [ "$cfg" = asan ] && [ $rc -ne 0 ] && grep -q "LeakSanitizer has encountered a fatal error\|LeakSanitizer does not work under ptrace" <<<"$out"; then
        # LSan cannot run under ptrace (strace, some sandboxes): keep ASan+UBSan, drop leak checks.
        env_extra[0]="${env_extra[0]/detect_leaks=1/detect_leaks=0}"
        echo "note [asan]: LeakSanitizer unavailable here, re-running with detect_leaks=0" >&2
        out="$(env "${env_extra[@]}" "$dir/stress" "$@" 2>&1)"; rc=$?
    fi
    if [ "$cfg" = tsan ] && [ $rc -ne 0 ] && grep -q "ThreadSanitizer: unexpected memory mapping\|FATAL: ThreadSanitizer" <<<"$out"; then
        # Kernels with high mmap_rnd_bits put mappings where this TSan runtime does not expect
        # them; without ASLR the layout is the classic one.
        if command -v setarch >/dev/null 2>&1 && setarch "$(uname -m)" -R true 2>/dev/null; then
            echo "note [tsan]: $(grep -m1 'FATAL' <<<"$out"); retrying under setarch -R" >&2
            out="$(env "${env_extra[@]}" setarch "$(uname -m)" -R "$dir/stress" "$@" 2>&1)"; rc=$?
            if [ $rc -ne 0 ] && grep -q "FATAL: ThreadSanitizer" <<<"$out"; then
                skip tsan "TSan cannot map its shadow even without ASLR: $(grep -m1 FATAL <<<"$out")"
                return
            fi
        else
            skip tsan "TSan runtime failed ($(grep -m1 FATAL <<<"$out")) and setarch -R is unavailable"
            return
        fi
    fi
    [ -n "$out" ] && printf '%s\n' "$out"
    if [ $rc -eq 77 ]; then
        echo "SKIP [$cfg]: stress skipped itself" >&2
    elif [ $rc -ne 0 ]; then
        echo "FAIL [$cfg]: stress exited with $rc" >&2
        rc=1
    fi
    return $rc
}

what="${1:-all}"
[ $# -gt 0 ] && shift
case "$what" in
    plain|asan|tsan)
        run_config "$what" "$@"
        exit $?
        ;;
    all)
        fails=0; skips=0
        for cfg in plain asan tsan; do
            run_config "$cfg" "$@"; rc=$?
            if [ $rc -eq 77 ]; then skips=$((skips + 1)); elif [ $rc -ne 0 ]; then fails=$((fails + 1)); fi
        done
        [ $fails -gt 0 ] && exit 1
        [ $skips -eq 3 ] && exit 77
        exit 0
        ;;
    *)
        echo "usage: $0 [plain|asan|tsan|all] [stress args...]" >&2
        exit 2
        ;;
esac
