"""Horovod's examples/pytorch/pytorch_mnist.py ported to distrib, with synthetic MNIST-shaped data.

    python -m launch -np 2 examples/horovod_mnist.py --epochs 2
    python -m launch --elastic --min-np 1 --max-np 2 -H localhost:1,127.0.0.1:1 examples/horovod_mnist.py

On top of the plain data-parallel port, a handful of lines give it what distrib.Run does: exact
resume from RUN_DIR's newest checkpoint (--resume auto), checkpoints every --checkpoint-every
steps, a checkpoint and a requeue on SIGUSR2 (Slurm's time-limit warning), elastic recovery, and
RUN_DIR/metrics.jsonl with the time breakdown (python -m distrib.report RUN_DIR draws it).
"""
import argparse

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

import distrib

# Training settings
parser = argparse.ArgumentParser(description='PyTorch MNIST Example')
parser.add_argument('--batch-size', type=int, default=64, metavar='N',
                    help='input batch size for training (default: 64)')
parser.add_argument('--test-batch-size', type=int, default=1000, metavar='N',
                    help='input batch size for testing (default: 1000)')
parser.add_argument('--epochs', type=int, default=10, metavar='N',
                    help='number of epochs to train (default: 10)')
parser.add_argument('--lr', type=float, default=0.01, metavar='LR',
                    help='learning rate (default: 0.01)')
parser.add_argument('--momentum', type=float, default=0.5, metavar='M',
                    help='SGD momentum (default: 0.5)')
parser.add_argument('--seed', type=int, default=42, metavar='S',
                    help='random seed (default: 42)')
parser.add_argument('--log-interval', type=int, default=10, metavar='N',
                    help='how many batches to wait before logging training status')
parser.add_argument('--fp16-allreduce', action='store_true', default=False,
                    help='use fp16 compression during allreduce')
parser.add_argument('--use-mixed-precision', action='store_true', default=False,
                    help='use mixed precision for training')
parser.add_argument('--use-adasum', action='store_true', default=False,
                    help='use adasum algorithm to do reduction')
parser.add_argument('--train-samples', type=int, default=60000, metavar='N',
                    help='size of the synthetic training set (default: 60000, as MNIST)')
parser.add_argument('--test-samples', type=int, default=10000, metavar='N',
                    help='size of the synthetic test set (default: 10000, as MNIST)')
parser.add_argument('--run-dir', default='runs/mnist', help='checkpoints and metrics.jsonl')
parser.add_argument('--resume', default='auto', help='auto (newest good checkpoint), none, or a checkpoint path')
parser.add_argument('--checkpoint-every', type=int, default=100, help='steps between checkpoints')


class SyntheticMNIST(torch.utils.data.Dataset):
    """MNIST-shaped data made on the fly (no download): 1x28x28 images of 10 classes, each
    class a fixed random pattern plus noise, normalised as MNIST is."""

    def __init__(self, samples, seed):
        self.samples, self.seed = samples, seed
        self.patterns = torch.rand(10, 1, 28, 28, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return self.samples

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = int(torch.randint(10, (1,), generator=g))
        image = self.patterns[label] + torch.randn(1, 28, 28, generator=g)
        return (image - 0.1307) / 0.3081, label


class Net(nn.Module):
    def __init__(self):
        super(Net, self).__init__()
        self.conv1 = nn.Conv2d(1, 10, kernel_size=5)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.conv2_drop = nn.Dropout2d()
        self.fc1 = nn.Linear(320, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2_drop(self.conv2(x)), 2))
        x = x.view(-1, 320)
        x = F.relu(self.fc1(x))
        x = F.dropout(x, training=self.training)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)


def train(args):
    def test(ctx):
        def metrics(model, batch):
            data, target = batch[0].to(ctx.device), batch[1].to(ctx.device)
            output = model(data)
            accuracy = output.argmax(dim=1).eq(target).float().mean()
            return {'loss': F.nll_loss(output, target).item(), 'accuracy': accuracy.item()}, len(target)
        # distrib: every test sample once over all workers; metrics averaged, weighted by samples.
        result = distrib.evaluate(model, distrib.eval_loader(test_dataset, args.test_batch_size, ctx), metrics)
        distrib.rank0_print(ctx, '\nTest set: Average loss: {:.4f}, Accuracy: {:.2f}%\n'.format(
            result['loss'], 100. * result['accuracy']))
        return result

    # distrib: start Horovod, pin the GPU or share the CPU cores among workers, seed.
    ctx = distrib.init(seed=args.seed)
    train_dataset = SyntheticMNIST(args.train_samples, seed=1)
    test_dataset = SyntheticMNIST(args.test_samples, seed=2)
    # distrib: each worker takes its part of every global batch, reshuffled every epoch.
    train_loader = distrib.ShardedLoader(train_dataset, args.batch_size, ctx, seed=args.seed)

    model = Net().to(ctx.device)
    # distrib: broadcast rank 0's parameters, then average the gradients every step.
    optimizer = distrib.wrap(model, optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum), ctx,
                             compression='fp16' if args.fp16_allreduce else 'none',
                             op='adasum' if args.use_adasum else 'average',
                             precision='fp16' if args.use_mixed_precision else 'fp32')
    # By default, Adasum doesn't need scaling up learning rate.
    schedule = distrib.LRSchedule(optimizer, base_lr=args.lr, world_size=ctx.size, decay='constant',
                                  scaling='none' if args.use_adasum else 'linear')

    # distrib: resume, checkpoints, preemption, elastic recovery, metrics, a test every epoch.
    run = distrib.Run(ctx, args.run_dir, model=model, optimizer=optimizer, loader=train_loader, schedule=schedule,
                      resume=args.resume, checkpoint_every=args.checkpoint_every, evaluate=test,
                      eval_every='epoch', log_every=args.log_interval)
    for _, (data, target) in run.steps(epochs=args.epochs):
        data, target = data.to(ctx.device), target.to(ctx.device)
        optimizer.zero_grad()
        with optimizer.autocast():
            output = model(data)
            loss = F.nll_loss(output, target)
        optimizer.backward(loss)
        optimizer.step()
        run.log(loss=loss)


if __name__ == '__main__':
    train(parser.parse_args())
