"""Rego policy: the decision input, the engines that decide it, and the stages that apply it."""
