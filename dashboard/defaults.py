"""What the dashboard opens on. The evaluation (benchmarks/eval_edits.py) decides the layer and rank."""

DEFAULT_MODEL = "spires"
DEFAULT_LAYER = "synthesis.b16.conv1"  # used when the model has it; otherwise the middle spatial layer
DEFAULT_RANK = 4
DEFAULT_SEEDS = "0-11"
GRID_COLUMNS = 6
DISPLAY_SCALE = 3  # 64-pixel images are shown (and brushed) at 192 pixels
