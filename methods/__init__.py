"""KV-cache compression methods: one module each (options, budgets, selection, and the hooks the reference engine
and the graph writer call), a registry of them, and the contract they share (`methods.base`).

Layering: below the graph writer (exporter) and the engines, above the op specifications (trt_plugins); it imports
neither exporter nor engines — what their hooks need is handed to them.
"""

from methods.base import KVPolicy
from methods.registry import POLICIES, check_policy_record, make_policy, options_for, register

__all__ = ["KVPolicy", "POLICIES", "check_policy_record", "make_policy", "options_for", "register"]
