"""Stage 1, the inventory: YAML files in, a validated :class:`~mutualbackup.inventory.model.Federation` out.

``model`` (the values), ``load`` (the files' shape), ``value_checks`` (one value at a time),
``yaml_lines`` (a YAML reader that keeps each value's line), ``units`` (sizes, durations, bandwidths).
Pure: reads the inventory's files, nothing else.
"""
