"""Zero-shot evaluation of CLIP checkpoints (installed as ``dcdb.eval``).

    from dcdb.eval import evaluate
    result = evaluate("runs/clip_score", "world/eval")   # -> runs/clip_score/eval_results.jsonl
    print(result.table(), result.average)

Tasks are folders in clip_benchmark's webdataset layout (DataComp's downloadable test sets work
as they are), listed by a DataComp-style ``tasklist.yml``/``tasklist.json`` (:mod:`.tasks`);
classification scores acc1/acc5/mean per-class recall, retrieval image/text recall@1/5/10
(:mod:`.metrics`). torch and open_clip are imported only when a model is evaluated.
"""

from .leaderboard import collect, plot, to_markdown
from .metrics import average_main_metric, classification_metrics, mean_per_class_recall, retrieval_metrics
from .runner import EVAL_INFO, RESULTS, EvalResult, evaluate, read_results
from .tasks import Task, load_tasks, write_task, write_tasklist

__all__ = [
    "EVAL_INFO",
    "RESULTS",
    "EvalResult",
    "Task",
    "average_main_metric",
    "classification_metrics",
    "collect",
    "evaluate",
    "load_tasks",
    "mean_per_class_recall",
    "plot",
    "read_results",
    "retrieval_metrics",
    "to_markdown",
    "write_task",
    "write_tasklist",
]
