"""A sweep's same-shape runs trained as one stacked model in one process: the stack (stack.py: vmap over the
members' weights and Adam over stacked tensors), the group whose member threads take turns (group.py, turns.py,
progress.py), a member's runner and step engine (member.py), and the plan that groups a sweep's jobs (plan.py).
The stacked launcher (hydra_plugins/vaelab_stacked_launcher) uses it; nothing on a solo run's path imports it."""
