"""The OpenAI-compatible gateway: everything that speaks the OpenAI API to clients.

The gateway holds no weights and imports no torch. It validates requests (``protocol``),
renders chat templates and turns token ids back into text (``text``), reports failures
as OpenAI error objects (``errors``), plans routes over the swarm's peers and drives one
generation through them; the FastAPI app in ``app`` ties these together.
"""
