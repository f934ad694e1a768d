"""Tests of the models' initialisation in aligned_reid.engine.build_model: a function of the seed and the
model index alone, whatever the input pipeline drew before it; train_ml.py's model 1 starts where train.py's
model does; model 2 from its own generator."""

import pytest
import torch

from aligned_reid import engine
from aligned_reid.model import Model
from conftest import load_script, main_with_fit

train = load_script('script', 'train')
train_ml = load_script('script', 'train_ml')


@pytest.fixture
def partitions(market_with_raw):
    return market_with_raw['partitions']


def initial_weights(script, partitions, exp_dir, *flags):
    """{model number: state dict} of the models a script's main hands to the epoch loop (which is replaced:
    nothing is trained)."""
    seen = {}

    def fit(args, run, models, *rest, **kw):
        for i, m in enumerate(models):
            seen[i + 1] = {k: v.detach().clone() for k, v in m.state_dict().items()}

    argv = ['--train_partitons', partitions, '--exp_dir', str(exp_dir), '--base_model', 'resnet18',
            '--pretrained', 'false', '--resize_h_w', '32', '16', '--ids_per_batch', '2', '--ims_per_id', '2',
            '--total_epochs', '1', '--final_test', 'false', '--device', 'cpu', '--workers', '0'] + list(flags)
    main_with_fit(script, argv, fit)
    return seen


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_initial_weights_do_not_depend_on_the_input_pipeline(partitions, tmp_path, one_torch_thread):
    workers = initial_weights(train, partitions, tmp_path / 'w', '--train_pipeline', 'workers', '--seed', '4')
    memory = initial_weights(train, partitions, tmp_path / 'm', '--train_pipeline', 'memory', '--seed', '4')
    assert same(workers[1], memory[1])
    other_seed = initial_weights(train, partitions, tmp_path / 'o', '--train_pipeline', 'workers', '--seed', '5')
    assert not same(workers[1], other_seed[1])


def test_model_1_of_train_ml_starts_as_train_py_and_model_2_differs(partitions, tmp_path, one_torch_thread):
    single = initial_weights(train, partitions, tmp_path / 's', '--seed', '4', '-idlw', '1')
    ml = initial_weights(train_ml, partitions, tmp_path / 'ml', '--seed', '4', '-idlw', '1')
    assert same(single[1], ml[1])
    assert not same(ml[1], ml[2])
    assert not torch.equal(ml[1]['base.conv1.weight'], ml[2]['base.conv1.weight'])


def test_build_model_against_a_model_built_under_its_own_seed():
    """The reference: a Model built right after torch.manual_seed(init_seed(seed, index)); the global RNG
    state is the same after build_model as before."""
    class Args:
        model_file, pretrained, pretrained_path = None, False, None
        base_model, last_stride, local_conv_out_channels, id_loss_weight = 'resnet18', 1, 16, 1.
        seed = 9

    run = engine.Run(0, 1, torch.device('cpu'), None, 'train.py')
    torch.manual_seed(123)
    torch.rand(7)  # whatever the data pipeline drew
    before = torch.random.get_rng_state()
    built = [engine.build_model(Args, 5, run, index=i).state_dict() for i in (0, 1)]
    assert torch.equal(torch.random.get_rng_state(), before)
    for i, state in enumerate(built):
        torch.manual_seed(engine.init_seed(9, i))
        reference = Model(base='resnet18', last_stride=1, local_conv_out_channels=16, num_classes=5,
                          pretrained=False).state_dict()
        assert same(state, reference)
    assert len({engine.init_seed(s, i) for s in range(4) for i in range(3)}) == 12
