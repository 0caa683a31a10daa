#!/usr/bin/env bash
# CI: build the wheel, install it alone into a fresh virtual environment and run each command's
# smallest form from a folder outside the clone, so a file the commands need but the wheel lacks
# (a recipe, a module loaded by path) fails here and not on a user's machine.
#
# The fresh environment gets the dependencies by reference, not by download: a .pth file points
# at a folder of links to the project environment's site-packages, minus this package (its
# editable install and metadata), so `daar_ops` and its entry points come from the wheel only.
# Usage: scripts/wheel_smoke.sh [PYTHON]   (default .venv/bin/python); ~20 s.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
PY=$(cd "$(dirname "${1:-.venv/bin/python}")" && pwd)/$(basename "${1:-.venv/bin/python}")  # not realpath: a venv python is a link
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
start=$(date +%s)

# built from a copy of the tree's files (tracked and new, not ignored): no build/ left in the
# clone, and no stale build/lib of an earlier build leaks into the wheel
mkdir "$T/src"
git ls-files -z --cached --others --exclude-standard | tar -c --null -T - | tar -x -C "$T/src"
"$PY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation \
    --wheel-dir "$T/dist" "$T/src" >/dev/null
WHEEL=$(ls "$T"/dist/daar_ops-*.whl)

"$PY" -m venv --without-pip "$T/venv"
V="$T/venv"
SITE=$("$V/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
DEPS=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# (a folder named site-packages: datasets' fingerprinting pickles modules found elsewhere by value)
DEPLINKS="$T/deps/site-packages"
mkdir -p "$DEPLINKS"
for entry in "$DEPS"/* "$DEPS"/.[!.]*; do
    name=$(basename "$entry")
    case "$name" in daar_ops|daar_ops-*|__editable__*daar_ops*|*.pth|.*) continue ;; esac
    ln -s "$entry" "$DEPLINKS/$name"
done
echo "$DEPLINKS" > "$SITE/project_deps.pth"
"$PY" -m pip --python "$V/bin/python" install --quiet --disable-pip-version-check --no-deps \
    --no-index "$WHEEL"
# dj-process for the fresh interpreter (Data-Juicer's own script is in the project environment)
printf '#!%s\nimport sys\nfrom data_juicer.tools.process_data import main\nsys.exit(main())\n' \
    "$V/bin/python" > "$V/bin/dj-process"
chmod +x "$V/bin/dj-process"

mkdir "$T/elsewhere" && cd "$T/elsewhere"
export PATH="$V/bin:$PATH" PYTHONPATH= HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
run() { echo "+ $*" >&2; "$@"; }

# the package, its recipes and its runner come from the wheel, not the clone
run "$V/bin/python" - "$REPO" <<'PY'
import sys
from pathlib import Path

import daar_ops
from daar_ops import compare_methods, evaluation
from daar_ops.commands import sandbox

repo = Path(sys.argv[1]).resolve()
where = Path(daar_ops.__file__).resolve()
assert repo not in where.parents, f"daar_ops imported from the clone: {where}"
for rel in evaluation.RECIPE_METHODS.values():
    assert (evaluation.RECIPES / rel).is_file(), rel
found = compare_methods.discover_methods()
assert {"random", "instruction_length", "qdit", "ds2", "daar"} <= set(found), found
assert all(Path(p).is_file() and repo not in Path(p).resolve().parents for p in found.values())
for method in sandbox.METHOD_RECIPES:
    assert (sandbox.RECIPE_DIR / f"process_{method}.yaml").is_file(), method
print(f"daar_ops {daar_ops.__version__} from {where.parent}; {len(found)} recipes shipped")
PY

# every command's smallest form
run daar-ops --version
daar-ops --help >/dev/null
COMMANDS=$("$V/bin/python" -c "
from daar_ops.cli import build_parser
print(' '.join(build_parser()._subparsers._group_actions[0].choices))")
test "$(echo $COMMANDS | wc -w)" -ge 7
for cmd in $COMMANDS; do
    run daar-ops "$cmd" --help >/dev/null
done

# Data-Juicer discovers the ops through the wheel's entry point
run "$V/bin/python" -c "
from data_juicer.ops import OPERATORS
ops = {'centroid_synthesis_mapper', 'domain_pseudo_label_mapper', 'diversity_reward_filter',
       'domain_contrastive_selector', 'ds2_rating_filter', 'ds2_selector', 'qdit_selector'}
assert ops <= set(OPERATORS.modules), ops - set(OPERATORS.modules)
print('dj ops discovered:', len(ops))"

# a real (model-free) run of a command and of a shipped recipe
"$V/bin/python" -c "
import json
for i in range(40):
    print(json.dumps({'instruction': f'task {i} ' + 'word ' * (i % 7), 'input': '',
                      'output': f'answer {i}'}))" > pool.jsonl
run daar-ops split --pool pool.jsonl --out split --probe-size 10
test "$(wc -l < split/probe.jsonl)" -eq 10
run "$V/bin/python" -c "
from pathlib import Path
from daar_ops import compare_methods as cm
inp, _, n = cm.write_slice(Path('pool.jsonl'), 20, 0, Path('.'))
res = cm.run_method('instruction_length', cm.RECIPES / 'baselines' / 'instruction_length.yaml',
                    inp, Path('cmp'), 0.2, n, timeout=300)
if res['status'] != 'ok':
    print(open('cmp/methods/instruction_length/dj-process.log').read()[-3000:])
assert res['status'] == 'ok', res
assert sum(1 for _ in open(res['export'])) == 4, res
print('instruction_length recipe from the wheel:', res['status'])"
echo "wheel smoke test passed in $(( $(date +%s) - start ))s ($(basename "$WHEEL"))"
