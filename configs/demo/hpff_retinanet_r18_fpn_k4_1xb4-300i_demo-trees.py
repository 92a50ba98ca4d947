# The demo detector trained with HPFF, K=4 (with K=2 the only cascade window
# would be module 0 alone): each module has an independent light head and a
# cascade loss over itself and the module before it; PFF runs the cascade
# aux's reconstruction decoder on 2x2 patches of its input, one at a time.
_base_ = './infopro_retinanet_r18_fpn_k2_1xb4-300i_demo-trees.py'

model = dict(
    num_modules=4,
    aux=dict(
        _delete_=True,
        type='mmlocal.HPFFAux',
        cascade_span=2,
        patch_grid=2,
        # stride-32 maps of padded COCO images are often odd-sized (25x42)
        patch_remainder='uneven',
        det_head=dict(feat_channels=128)))
