package dev.tidemark.it;

import java.util.ArrayList;
import java.util.List;
import java.util.Map;

import org.apache.kafka.common.config.ConfigDef;
import org.apache.kafka.connect.connector.Task;
import org.apache.kafka.connect.sink.SinkConnector;

/**
 * A sink connector for Tidemark's integration tests: it writes every record
 * exactly as the worker's converters read it (see {@link ExactSinkTask}), where
 * FileStreamSink's {@code toString()} dump loses bytes and quoting.
 */
public class ExactSinkConnector extends SinkConnector {
    static final String FILE_CONFIG = "file";

    private Map<String, String> props;

    @Override
    public String version() {
        return "0";
    }

    @Override
    public void start(Map<String, String> props) {
        this.props = props;
    }

    @Override
    public Class<? extends Task> taskClass() {
        return ExactSinkTask.class;
    }

    @Override
    public List<Map<String, String>> taskConfigs(int maxTasks) {
        // One task, one file: lines are never interleaved by two writers.
        List<Map<String, String>> configs = new ArrayList<>();
        configs.add(props);
        return configs;
    }

    @Override
    public void stop() {
    }

    @Override
    public ConfigDef config() {
        return new ConfigDef().define(FILE_CONFIG, ConfigDef.Type.STRING, ConfigDef.Importance.HIGH,
                "the file to append one JSON line per record to");
    }
}
