"""The ClientApp: trains, and answers FDCR's request for the Fisher diagonal (one line)."""

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fdcrapp.task import Net, load_data, test, train
from fl_defense.client import add_fisher

app = ClientApp()


@app.train()
def train_fn(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    trainloader, _ = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss = train(net, trainloader, context.run_config.get("local-epochs", 1), msg.content["config"].get("lr", 0.1))
    content = RecordDict({
        "arrays": ArrayRecord(net.state_dict()),
        "metrics": MetricRecord({"train_loss": loss, "num-examples": len(trainloader.dataset)}),
    })
    add_fisher(content, net, trainloader, msg.content["config"])  # FDCR and SDFC need it; others don't ask
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_fn(msg: Message, context: Context) -> Message:
    net = Net()
    net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    _, testloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    loss, acc = test(net, testloader)
    metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(testloader.dataset)})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)
