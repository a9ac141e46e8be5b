module plugvisor.invalid/gopeer

go 1.19
