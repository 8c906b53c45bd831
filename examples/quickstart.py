"""dmlfast in a few lines: train an embedding with the fused Proxy-Anchor loss, then measure
Recall@K and MAP@R on classes the model never saw.

The data are synthetic: each class is a Gaussian cluster in a 64-d space seen through a fixed
random non-linear map, so an embedding must learn to undo the map. Runs in seconds on a CPU.

    python examples/quickstart.py
"""
import torch

import dmlfast
from dmlfast.evaluation import retrieval_metrics

torch.manual_seed(0)
INPUT_DIM, LATENT_DIM, EMBEDDING_SIZE = 128, 64, 32
TRAIN_CLASSES, TEST_CLASSES, PER_CLASS = 200, 100, 20

mixing = torch.nn.Sequential(torch.nn.Linear(LATENT_DIM, INPUT_DIM), torch.nn.Tanh(), torch.nn.Linear(INPUT_DIM, INPUT_DIM))
mixing.requires_grad_(False)


def make_split(num_classes):
    centres = torch.randn(num_classes, LATENT_DIM)
    labels = torch.arange(num_classes).repeat_interleave(PER_CLASS)
    latent = centres[labels] + 1.1 * torch.randn(len(labels), LATENT_DIM)
    return mixing(latent), labels


train_x, train_y = make_split(TRAIN_CLASSES)
test_x, test_y = make_split(TEST_CLASSES)  # unseen classes

model = torch.nn.Sequential(torch.nn.Linear(INPUT_DIM, 256), torch.nn.ReLU(), torch.nn.Linear(256, EMBEDDING_SIZE))
loss_fn = dmlfast.ProxyAnchorLoss(num_classes=TRAIN_CLASSES, embedding_size=EMBEDDING_SIZE)
optimizer = torch.optim.AdamW([
    {"params": model.parameters(), "lr": 1e-3},
    {"params": loss_fn.parameters(), "lr": 1e-1},  # proxies learn faster, as in the published recipe
])


def evaluate():
    with torch.no_grad():
        return retrieval_metrics(model(test_x), test_y, ks=(1, 2, 4, 8), metrics=("recall", "map@r"))


before = evaluate()
for epoch in range(15):
    for batch in torch.randperm(len(train_y)).split(128):
        loss = loss_fn(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
after = evaluate()

print(f"dmlfast {dmlfast.__version__}: {dmlfast.build_info()}")
print(f"last training loss: {loss.item():.3f}")
print(f"{'metric':<10} {'untrained':>10} {'trained':>10}   (on {TEST_CLASSES} unseen classes)")
for name in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
    print(f"{name:<10} {before[name]:>10.3f} {after[name]:>10.3f}")
