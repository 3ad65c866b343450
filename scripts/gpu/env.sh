# Sourced by the GPU scripts on the device machine: unpacks the carried CUDA binary and points
# the loader at the CUDA 13 libraries of the machine's PyTorch wheels (see ../shared/docs/gpu.md).
export LD_LIBRARY_PATH=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))'):${LD_LIBRARY_PATH:-}
G=${G:-.gpu}
xz -dkf "$G/lantern.xz" && chmod +x "$G/lantern"
L="$G/lantern"
mkdir -p /tmp/cuda-cache && export CUDA_CACHE_PATH=/tmp/cuda-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# same_tokens LABEL "CMD_A" "CMD_B" DECODING...: generates the same images (classes 0 and 7,
# seed 3) with both command prefixes (a binary, optionally behind `env VAR=...`) for every
# --decoding value and prints whether the token files are identical.
same_tokens() {
  local label=$1 a=$2 b=$3 d args r; shift 3
  for d in "$@"; do
    args="--class 0,7 -n 2 --device cuda --seed 3 --decoding $d"
    $a generate $args --out /tmp/t1 --save-tokens /tmp/t1.json --force 2>&1 | grep -i error | head -3
    $b generate $args --out /tmp/t0 --save-tokens /tmp/t0.json --force 2>&1 | grep -i error | head -3
    if cmp -s /tmp/t1.json /tmp/t0.json; then r=IDENTICAL; else r=DIFFER; fi
    echo "tokens $label, --decoding $d: $r"
  done
}

# greedy_equal LABEL CMD A B: token files of --decoding A and --decoding B (classes 0 and 7,
# seed 3) with command prefix CMD
greedy_equal() {
  local args="--class 0,7 -n 2 --device cuda --seed 3"
  $2 generate $args --decoding $3 --out /tmp/g1 --save-tokens /tmp/g1.json --force 2>&1 | grep -i error | head -3
  $2 generate $args --decoding $4 --out /tmp/g2 --save-tokens /tmp/g2.json --force 2>&1 | grep -i error | head -3
  if cmp -s /tmp/g1.json /tmp/g2.json; then r=IDENTICAL; else r=DIFFER; fi
  echo "tokens $1, --decoding $3 vs $4: $r"
}

# with_base: unpacks the carried $G/lantern-base.xz (a second binary for A/B runs) as $B and the
# kernel test binary $G/fused_forward.xz (when carried), then warms both binaries up (the driver's first-run
# JIT compilation of our kernels, ~20-50 s, is not timed).
with_base() {
  B="$G/lantern-base"; xz -dkf "$B.xz" && chmod +x "$B"
  [ -e "$G/fused_forward.xz" ] && xz -dkf "$G/fused_forward.xz" && chmod +x "$G/fused_forward"
  local bin
  for bin in "$B" "$L"; do
    "$bin" bench --random-weights --preset tiny --device cuda --loop-images 1 --loop-tokens 8 2>&1 | grep -i "error" | head -5
  done
}

# kernel_tests: runs the CUDA tests of the carried kernel test binary (with_base unpacks it)
# against the carried fixtures, printing results, per-case lines and failures, and keeping
# them in $OUT/kernel_tests.txt.
kernel_tests() {
  env LANTERN_FIXTURES=crates/lantern/tests/fixtures/gpt timeout 300 "$G/fused_forward" --nocapture cuda_ 2>&1 \
    | grep -E "^test |test result|panicked|rel err|output diff" | tee "$OUT/kernel_tests.txt"
}

# ab_start: the common start of an A/B run: restarts the SECONDS clock, unpacks and warms the
# base binary and the kernel tests (with_base), runs the tests unless SKIP_TESTS=1.
ab_start() {
  SECONDS=0
  with_base
  [ "${SKIP_TESTS:-0}" = 1 ] || kernel_tests
  echo "tests done ${SECONDS}s"
}

# variant V: sets `bin` and `envs` for a variant V: env assignments joined by '+' for $L
# (X=0: as built), or BASE or BASE:assignments for $B, the carried base binary (with_base).
variant() {
  bin="$L"; envs=$1
  case $1 in BASE) bin="$B"; envs=X=0 ;; BASE:*) bin="$B"; envs=${1#BASE:} ;; esac
  envs=${envs//+/ }
}

# variant_rounds REGEX: ROUNDS rounds (default 1) over PRESETS x VARIANTS of the step bench
# (`bench --random-weights`, LOOP images of TOKENS tokens for the loop rows), printing the lines
# that match REGEX, for each variant (see `variant`).
variant_rounds() {
  local re=$1 r p e bin envs
  for r in $(seq 1 ${ROUNDS:-1}); do
    for p in ${PRESETS:-t2i-xl-256 c2i-xl-384}; do
      for e in ${VARIANTS:-BASE X=0}; do
        variant "$e"
        echo "== round $r $p $(basename $bin) $envs"
        env $envs timeout 200 "$bin" bench --random-weights --preset $p --device cuda --loop-images ${LOOP:-0} --loop-tokens ${TOKENS:-64} 2>&1 | grep -E "$re"
      done
    done
  done
}

# picks_tests: unpacks the carried library test binary $G/lantern_lib.xz and runs the picks'
# CUDA-vs-CPU test (cuda_picks), keeping its result lines in $OUT/picks_test.txt.
picks_tests() {
  xz -dkf "$G/lantern_lib.xz" && chmod +x "$G/lantern_lib"
  timeout 180 "$G/lantern_lib" --nocapture cuda_picks 2>&1 | grep -E "^test |test result|panicked" | tee "$OUT/picks_test.txt"
}

# ncu_picks NAME CMD...: Nsight Compute over the drafting-pick kernels (draft_*) of 6 SD-static
# loop steps at t2i-xl-256 shapes of CMD (a binary, optionally behind `env VAR=...`); keeps the
# csv as $OUT/ncu_NAME.csv and prints each kernel's launches and median / min µs per grid.
ncu_picks() {
  local name=$1; shift
  timeout 150 "${NCU:-/usr/local/cuda/bin/ncu}" --metrics gpu__time_duration.sum --csv --page raw \
    --kernel-name regex:draft_ "$@" bench --random-weights --preset t2i-xl-256 --device cuda \
    --loop-only --loop-modes sd-static --loop-images 1 --loop-tokens 6 > "$OUT/ncu_$name.csv" 2> /dev/null
  echo "== ncu $name rc $?"
  python3 - "$OUT/ncu_$name.csv" <<'PY'
import csv, sys, statistics, collections
rows = list(csv.reader(open(sys.argv[1])))
hdr = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
if hdr is None: print("no kernel rows"); sys.exit()
h = rows[hdr]; kn, t, g = h.index("Kernel Name"), h.index("gpu__time_duration.sum"), h.index("Grid Size")
by = collections.defaultdict(list)
for r in rows[hdr + 2:]:
    try: by[(r[kn], r[g])].append(float(r[t].replace(",", "")) / 1e3)
    except (ValueError, IndexError): pass
for (name, grid), v in sorted(by.items()):
    print(f"{name:20s} grid {grid:12s} {len(v):4d} x median {statistics.median(v):8.2f} us  min {min(v):8.2f}")
PY
}

# full_images VARIANT...: whole images of the loop bench per variant (see `variant`): t2i-xl-256,
# 1 image of 256 tokens, and with FULL_C2I=1 c2i-xl-384, 576 tokens; ar, sd-static and
# lantern++-static. Keeps the rows in $OUT/full_images.txt.
full_images() {
  local p e bin envs
  for p in t2i-xl-256:256 $([ "${FULL_C2I:-0}" = 1 ] && echo c2i-xl-384:576); do
    for e in "$@"; do
      variant "$e"
      echo "== full image ${p%%:*} $(basename $bin) $envs"
      env $envs timeout 200 "$bin" bench --random-weights --preset ${p%%:*} --device cuda --loop-only \
        --loop-modes ar,sd-static,lantern++-static --loop-images 1 --loop-tokens ${p##*:} 2>&1 | grep -E "^\| (ar|sd|lantern)|rror"
    done
  done 2>&1 | tee "$OUT/full_images.txt"
}

# step_reports: the full step bench of $L for both presets (targets table, expected latency,
# loop rows), kept whole as $OUT/report_PRESET.txt, its summary lines printed.
step_reports() {
  local p
  for p in t2i-xl-256 c2i-xl-384; do
    timeout 240 ${PIN:+taskset -c $PIN} "$L" bench --random-weights --preset $p --device cuda --loop-images 2 --loop-tokens 64 > "$OUT/report_$p.txt" 2>&1
    echo "== report $p"; grep -E "cuda graph\) \||drafting phase|over the decode|share of|overhead|^  [A-Z]|expected|rror" "$OUT/report_$p.txt"
  done
}
