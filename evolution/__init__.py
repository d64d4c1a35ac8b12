"""The evolutionary search (EMONAS-Net's SaMEA): genome, MOEA/D loop, candidate training, run records."""
