"""Reruns the seed study of drop_remainder.md: the chapter's recipe with and without the short
last batch of every epoch, seeds 0-5 (about 12 two-core CPU minutes per setting).

    python docs/results/drop_remainder_study.py
"""

import tempfile

import tensorflow as tf

import tfbn


def batch_statistics_accuracy(model, dataset) -> float:
    """Test accuracy with each test batch normalized by its own statistics (training mode)."""
    right = total = 0
    for images, labels in dataset:
        predicted = tf.argmax(model(images, training=True), -1, output_type=tf.int32)
        right += int(tf.reduce_sum(tf.cast(predicted == labels, tf.int32)))
        total += int(labels.shape[0])
    return right / total


for drop in (False, True):
    for seed in range(6):
        result = tfbn.train(
            "tfbn",
            seed=seed,
            drop_remainder=drop,
            run_dir=tempfile.mkdtemp(),
            export=False,
            verbose=2,
        )
        # Last: training mode also moves the moving statistics.
        batch_stats = batch_statistics_accuracy(result.model, tfbn.load_fashion_mnist(256).test)
        print(
            f"seed {seed}, short batch {'dropped' if drop else 'kept'}: train acc "
            f"{result.train_acc:.3f}, test acc {result.test_acc_before_recalibration:.3f} moving "
            f"stats, {result.test_acc:.3f} recalibrated, {batch_stats:.3f} batch stats"
        )
