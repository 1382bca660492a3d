"""Chat completions (``/v1/chat/completions``): the second workload (issue #11, in progress).

``request.py`` validates OpenAI chat bodies; the workload class, its runner on the car (the
engine in ``idlefleet.llm``) and its registration come next.
"""
