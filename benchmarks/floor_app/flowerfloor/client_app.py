"""Returns what it receives: a training message's arrays go back unchanged, an evaluation
message gets one metric. The process imports flwr and numpy, nothing else."""

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = RecordDict({"arrays": msg.content.array_records["arrays"],
                        "metrics": MetricRecord({"num-examples": 1})})
    return Message(reply, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"heldout-accuracy": 0.0})}),
                   reply_to=msg)
