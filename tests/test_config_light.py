"""Reading a config must stay cheap: launchers, planners and checks load it before (or without) any model."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "deepspeed", "mlflow", "webdataset")

PROBE = """
import json, sys
from pathlib import Path
from mfrnet_ds.config import load_config
import mfrnet_ds
for path in sorted(Path("configs").glob("*.yaml")):
    load_config(path, ["model.pretrained=none"])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in {heavy})))
"""


def test_loading_every_config_imports_nothing_heavy():
    assert sorted(ROOT.glob("configs/*.yaml")), "no configs to load"
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY))], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
