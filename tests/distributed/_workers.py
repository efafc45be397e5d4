"""What every worker script of tests/distributed shares."""

import torch


def shut_down(acc) -> None:
    """Leave together and close the process group: a rank that exits while another still holds gloo's
    connections can abort it at interpreter exit ("terminate called without an active exception")."""
    acc.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
