"""The stages of a round and of an evaluation as Prefect tasks, one per declaration in `ospo_core.pipeline`."""

from ospo_core import pipeline
from tasks.runner import StageTask

# 1. Initial prompt generation
generate_prompts = StageTask(pipeline.PROMPTS)
# 2. Hard preference pair generation
perturb = StageTask(pipeline.NEGATIVES)
densify = StageTask(pipeline.DENSE)
render = StageTask(pipeline.IMAGES)
# 3. Filtering and selection
questions = StageTask(pipeline.QUESTIONS)
self_vqa = StageTask(pipeline.VQA)
select_pairs = StageTask(pipeline.PAIRS)
object_masks = StageTask(pipeline.MASKS)
# 4. Object-centric preference optimization
train = StageTask(pipeline.TRAIN)
# Held-out evaluation
eval_questions = StageTask(pipeline.EVAL_QUESTIONS)
judge_eval_images = StageTask(pipeline.EVAL)
rejudge_eval_images = StageTask(pipeline.REJUDGE)
