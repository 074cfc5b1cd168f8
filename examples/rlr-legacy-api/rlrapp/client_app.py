"""A NumPyClient, as in Flower's tutorials. It also answers FDCR's and SDFC's request for the
Fisher diagonal (one line in fit), so the server may swap RLR for either without touching it."""

from collections import OrderedDict

import torch
from flwr.app import Context
from flwr.client import ClientApp, NumPyClient

from rlrapp.task import Net, load_data, test, train
from fl_defense.client import fisher_metrics


def get_weights(net):
    return [v.cpu().numpy() for v in net.state_dict().values()]


def set_weights(net, parameters):
    net.load_state_dict(OrderedDict((k, torch.tensor(v)) for k, v in zip(net.state_dict().keys(), parameters)))


class FlowerClient(NumPyClient):
    def __init__(self, net, trainloader, valloader, local_epochs, lr):
        self.net, self.trainloader, self.valloader = net, trainloader, valloader
        self.local_epochs, self.lr = local_epochs, lr

    def fit(self, parameters, config):
        set_weights(self.net, parameters)
        loss = train(self.net, self.trainloader, self.local_epochs, self.lr)
        metrics = {"train_loss": loss}
        metrics.update(fisher_metrics(self.net, self.trainloader, config))  # only when the server asks
        return get_weights(self.net), len(self.trainloader.dataset), metrics

    def evaluate(self, parameters, config):
        set_weights(self.net, parameters)
        loss, acc = test(self.net, self.valloader)
        return loss, len(self.valloader.dataset), {"accuracy": acc}


def client_fn(context: Context):
    trainloader, valloader = load_data(context.node_config["partition-id"], context.node_config["num-partitions"])
    return FlowerClient(Net(), trainloader, valloader, context.run_config.get("local-epochs", 1),
                        context.run_config.get("lr", 0.1)).to_client()


app = ClientApp(client_fn=client_fn)
