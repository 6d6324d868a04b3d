"""Stage 2, the decisions: where replicas go, when jobs run, what prune keeps, when compaction may run.

Pure functions of the inventory, the recorded history and a clock passed in; tested by value.
"""
