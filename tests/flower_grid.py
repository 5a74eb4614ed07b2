"""A Flower `Grid` that runs a `ClientApp` in this process (tests only):
the server's logic and the client's run exactly as under Flower, without
the simulation engine's worker processes."""

from flwr.app import Context
from flwr.app import Error
from flwr.app import Message
from flwr.app import RecordDict
from flwr.supercore.task_identity import TaskIdentity


class InProcessGrid:
    def __init__(self, client_app, num_nodes, run_config=None):
        self.client_app = client_app
        self.num_nodes = num_nodes
        self.run_config = dict(run_config or {})
        self.sent = []
        self.replies = []
        # what a SuperLink would set for the ServerApp's messages
        TaskIdentity.run_id = 1
        TaskIdentity.task_id = 1
        TaskIdentity.node_id = 0

    def get_node_ids(self):
        return list(range(1, self.num_nodes + 1))

    def send_and_receive(self, messages, timeout=None):
        out = []
        for m in messages:
            node = m.metadata.dst_node_id
            context = Context(
                run_id=1, node_id=node,
                node_config={"partition-id": node - 1, "num-partitions": self.num_nodes},
                state=RecordDict(), run_config=self.run_config,
            )
            self.sent.append(m)
            try:
                reply = self.client_app(m, context)
            except Exception as e:  # Flower turns a ClientApp's exception into an error reply
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=m)
            self.replies.append(reply)
            out.append(reply)
        return out
