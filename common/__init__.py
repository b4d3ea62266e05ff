"""What every package of tensormine imports, and which imports none of them: the error
root (`common.errors`), the base of typed config sections (`common.schema`).

The packages (`chain`, `store`, `train`, `averaging`, `validation`, `subnet`) sit above
this one; `tensormine/` is the top that composes their configs and wires the commands.
"""
